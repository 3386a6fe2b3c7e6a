"""Short text history for the LLM: recent-K or semantic top-K (SUBR) behaviours, in time order."""

from __future__ import annotations

import numpy as np

from service.retrieval.faiss_index import ItemIndex


def recent_positions(n_history: int, k: int) -> np.ndarray:
    """Positions of the last k behaviours of a chronological history of length n_history."""
    return np.arange(max(n_history - k, 0), n_history)


def semantic_positions(hist_items: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray, k: int) -> list[np.ndarray]:
    """Per candidate, the positions of the k history behaviours most similar to it, ascending.

    One FAISS index over the history answers every candidate in a single batched search. When
    an item occurs several times in the history its latest occurrence represents it.
    """
    hist_items = np.asarray(hist_items, dtype=np.int64)
    if len(hist_items) == 0 or k <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in candidates]
    latest = {int(item): pos for pos, item in enumerate(hist_items)}
    _, ids = ItemIndex(embeddings, np.fromiter(latest, dtype=np.int64)).search(
        embeddings[np.asarray(candidates, dtype=np.int64)], min(k, len(latest)))
    return [np.sort(np.array([latest[int(i)] for i in row if i >= 0], dtype=np.int64)) for row in ids]
