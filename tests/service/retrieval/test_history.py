import numpy as np

from service.retrieval.history import recent_positions, semantic_positions


def embeddings(n: int = 60, dim: int = 8, seed: int = 0) -> np.ndarray:
    emb = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0  # padding row
    return emb


def test_semantic_positions_equal_brute_force_with_latest_occurrences() -> None:
    rng = np.random.default_rng(1)
    emb = embeddings()
    for _ in range(50):
        hist = rng.integers(1, 60, size=int(rng.integers(1, 40)))  # with repeats
        cands = rng.integers(1, 60, size=5)
        k = int(rng.integers(1, 8))
        latest = {int(item): pos for pos, item in enumerate(hist)}
        distinct = np.array(sorted(latest))
        for cand, got in zip(cands, semantic_positions(hist, cands, emb, k)):
            sims = emb[distinct] @ emb[cand]
            best = distinct[np.argsort(-sims, kind="stable")[: min(k, len(distinct))]]
            assert got.tolist() == sorted(latest[int(i)] for i in best)


def test_a_repeated_item_is_represented_by_its_latest_position() -> None:
    emb = embeddings()
    got = semantic_positions(np.array([7, 3, 7, 9]), np.array([7]), emb, 1)
    assert got[0].tolist() == [2]


def test_empty_history_and_recent_positions() -> None:
    emb = embeddings()
    assert [p.tolist() for p in semantic_positions(np.zeros(0, np.int64), np.array([1, 2]), emb, 3)] == [[], []]
    assert recent_positions(5, 3).tolist() == [2, 3, 4]
    assert recent_positions(2, 3).tolist() == [0, 1]
