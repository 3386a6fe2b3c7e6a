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
    # latest occurrence of each distinct item: first occurrence in the reversed history
    items, first_reversed = np.unique(hist_items[::-1], return_index=True)  # items sorted
    latest = len(hist_items) - 1 - first_reversed
    _, ids = ItemIndex(embeddings, items).search(embeddings[np.asarray(candidates, dtype=np.int64)],
                                                 min(k, len(items)))
    found = ids >= 0
    positions = latest[np.searchsorted(items, np.where(found, ids, items[0]))]
    return [np.sort(row[ok]) for row, ok in zip(positions, found)]
