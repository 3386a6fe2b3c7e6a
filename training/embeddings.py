"""Semantic item embeddings with all-MiniLM-L6-v2, loaded offline from its PyPI package.

Row i of the saved matrix is item_idx i; row 0 (padding) is zeros. Rows are L2-normalized so a
dot product is the cosine similarity the search unit and the prompt retriever use.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from service.knowledge.encode import minilm_path


def item_text(row: pd.Series) -> str:
    """Title, year and genres: the text both the embedder and the prompts describe an item with."""
    title = str(row["title"])
    year = row.get("year")
    if year is not None and not pd.isna(year):
        title = f"{title} ({int(year)})"
    genres = ", ".join(g for g in str(row.get("genres") or "").split("|") if g)
    return f"{title}. Genres: {genres}." if genres else f"{title}."


def embed_items(items: pd.DataFrame, batch_size: int = 256, show_progress: bool = True) -> np.ndarray:
    """(max item_idx + 1, 384) float32 normalized embeddings of the catalog in ``items``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the package; never fetch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    texts = [item_text(row) for _, row in items.iterrows()]
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
        show_progress_bar=show_progress,
    ).astype(np.float32)
    table = np.zeros((int(items["item_idx"].max()) + 1, vectors.shape[1]), dtype=np.float32)
    table[items["item_idx"].to_numpy()] = vectors
    return table
