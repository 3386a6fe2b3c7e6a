import numpy as np

from service.retrieval.faiss_index import ItemIndex, topk_items


def _table(n: int = 50, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n + 1, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0] = 0
    return x


def test_search_matches_brute_force_over_the_subset() -> None:
    emb = _table()
    subset = np.array([3, 7, 9, 20, 21, 30, 44])
    queries = emb[[1, 2, 5]]
    scores, ids = ItemIndex(emb, subset).search(queries, 3)
    brute = queries @ emb[subset].T
    expected = subset[np.argsort(-brute, axis=1)[:, :3]]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :3], rtol=1e-5)


def test_batched_equals_one_by_one_and_pads_missing() -> None:
    emb = _table()
    subset = np.array([0, 4, 5, 6])  # 0 is padding and never returned
    batch = topk_items(emb, np.array([1, 2, 3]), subset, 5)
    for row, q in zip(batch, [1, 2, 3]):
        np.testing.assert_array_equal(row, topk_items(emb, np.array([q]), subset, 5)[0])
    assert (batch[:, 3:] == -1).all() and set(batch[:, :3].ravel()) == {4, 5, 6}


def test_empty_index() -> None:
    scores, ids = ItemIndex(_table(), np.array([], dtype=np.int64)).search(_table()[[1, 2]], 4)
    assert ids.shape == (2, 4) and (ids == -1).all()
