"""FAISS helpers: an inner-product index over a chosen set of items, searched in batches.

Embeddings are L2-normalized, so inner product is cosine similarity. One ``search`` call takes
every query of a request at once (e.g. all candidates against one user's history).
"""

from __future__ import annotations

import faiss
import numpy as np


class ItemIndex:
    """Exact inner-product index over ``item_ids`` (rows of ``embeddings``); returns item ids."""

    def __init__(self, embeddings: np.ndarray, item_ids: np.ndarray) -> None:
        ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        ids = ids[ids > 0]  # 0 is padding
        if len(ids) and ids.max() >= len(embeddings):
            raise ValueError(f"item id {int(ids.max())} has no embedding row")
        self.dim = embeddings.shape[1]
        self.index = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(embeddings[ids], dtype=np.float32), ids)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k) best first; ids are -1 where fewer than k items exist."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if len(self) == 0 or k <= 0:
            return np.full((len(q), max(k, 0)), -np.inf, np.float32), np.full((len(q), max(k, 0)), -1, np.int64)
        return self.index.search(q, k)


def search_on_one_thread() -> None:
    """Searches from the calling thread run on it alone. faiss has an OpenMP runtime of its own
    (beside torch's): a search on several threads leaves their team spinning after it, beside
    whatever else computes, for the few milliseconds a search of one user's history would gain."""
    faiss.omp_set_num_threads(1)


def topk_items(embeddings: np.ndarray, query_ids: np.ndarray, item_ids: np.ndarray, k: int) -> np.ndarray:
    """For each query item, the ids of the k most similar items among ``item_ids`` (Q, k), -1 padded."""
    _, ids = ItemIndex(embeddings, item_ids).search(embeddings[np.asarray(query_ids, dtype=np.int64)], k)
    return ids
