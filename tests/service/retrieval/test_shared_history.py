"""Retrieval for the shared prompt form: the history behaviours most similar to any candidate."""

from __future__ import annotations

import numpy as np

from service.retrieval.history import semantic_positions, shared_positions

EMB = np.random.default_rng(4).normal(size=(60, 8)).astype(np.float32)
EMB /= np.linalg.norm(EMB, axis=1, keepdims=True)
EMB[0] = 0
HISTORY = np.array([5, 9, 13, 2, 40, 33, 7, 21, 9, 50, 44, 18])  # item 9 twice: its latest position (8) counts


def brute_force(hist: np.ndarray, candidates: np.ndarray, k: int) -> set[int]:
    latest = {int(item): pos for pos, item in enumerate(hist)}
    best = {item: float((EMB[item] @ EMB[candidates].T).max()) for item in latest}
    return {latest[item] for item in sorted(best, key=lambda i: -best[i])[:k]}


def test_top_k_by_best_similarity_to_any_candidate_in_time_order() -> None:
    candidates = np.array([11, 30, 57, 3])
    for k in (1, 4, 6, 20):
        pos = shared_positions(HISTORY, candidates, EMB, k)
        assert list(pos) == sorted(pos) and len(pos) == min(k, len(set(HISTORY.tolist())))
        assert set(pos.tolist()) == brute_force(HISTORY, candidates, k)


def test_independent_of_the_candidates_order() -> None:
    candidates = np.array([11, 30, 57, 3, 26])
    assert np.array_equal(shared_positions(HISTORY, candidates, EMB, 5),
                          shared_positions(HISTORY, candidates[::-1], EMB, 5))


def test_one_candidate_is_per_target_retrieval() -> None:
    for cand in (11, 30, 57):
        assert np.array_equal(shared_positions(HISTORY, np.array([cand]), EMB, 4),
                              semantic_positions(HISTORY, np.array([cand]), EMB, 4)[0])


def test_empty_inputs() -> None:
    assert len(shared_positions(np.zeros(0, np.int64), np.array([3]), EMB, 4)) == 0
    assert len(shared_positions(HISTORY, np.array([3]), EMB, 0)) == 0
    assert len(shared_positions(HISTORY, np.zeros(0, np.int64), EMB, 4)) == 0
