"""Short text history for the LLM: recent-K or semantic top-K (SUBR) behaviours, in time order.

Semantic retrieval comes in two forms, one per prompt form: per candidate (``semantic_positions``,
ReLLa's SUBR) and once for a request's whole candidate set (``shared_positions``).
"""

from __future__ import annotations

import numpy as np

from service.retrieval.faiss_index import ItemIndex


def recent_positions(n_history: int, k: int) -> np.ndarray:
    """Positions of the last k behaviours of a chronological history of length n_history."""
    return np.arange(max(n_history - k, 0), n_history)


def semantic_positions(hist_items: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray, k: int) -> list[np.ndarray]:
    """Per candidate, the positions of the k history behaviours most similar to it, ascending.

    One FAISS index over the history answers every candidate in a single batched search.
    """
    hist_items = np.asarray(hist_items, dtype=np.int64)
    if len(hist_items) == 0 or k <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in candidates]
    items, latest, _, ids = _search(hist_items, candidates, embeddings, k)
    found = ids >= 0
    positions = latest[np.searchsorted(items, np.where(found, ids, items[0]))]
    return [np.sort(row[ok]) for row, ok in zip(positions, found)]


def shared_positions(hist_items: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k history behaviours most similar to any of the candidates, ascending.

    A behaviour scores its best similarity to any candidate; the k best are kept. That is the
    exact top k of every (behaviour, candidate) similarity, de-duplicated by behaviour, so it
    comes from the candidates' own top-k lists (one batched search, as per candidate), it does
    not depend on the order the candidates are listed in, and for a single candidate it is that
    candidate's own top k (``semantic_positions``). A candidate unlike every behaviour then gets
    no line of its own: the history holds the behaviours that say most about the set.
    """
    hist_items = np.asarray(hist_items, dtype=np.int64)
    if len(hist_items) == 0 or k <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    items, latest, scores, ids = _search(hist_items, candidates, embeddings, k)
    ids, scores = ids.ravel(), scores.ravel()
    found = ids >= 0
    ids, scores = ids[found], scores[found]
    order = np.lexsort((ids, -scores))  # best similarity first, ties by item id
    distinct, first = np.unique(ids[order], return_index=True)  # each item at its best similarity
    best = distinct[np.argsort(first, kind="stable")][:k]
    return np.sort(latest[np.searchsorted(items, best)])


def _search(hist_items: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(distinct history items sorted, each one's latest position, then the candidates' top-k
    similarities and item ids, -1 padded). An item that occurs several times in the history is
    represented by its latest occurrence."""
    # latest occurrence of each distinct item: first occurrence in the reversed history
    items, first_reversed = np.unique(hist_items[::-1], return_index=True)  # items sorted
    latest = len(hist_items) - 1 - first_reversed
    scores, ids = ItemIndex(embeddings, items).search(embeddings[np.asarray(candidates, dtype=np.int64)],
                                                      min(k, len(items)))
    return items, latest, scores, ids
