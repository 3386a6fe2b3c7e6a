"""Knowledge directories for tests: vectors in the layout ``reclora knowledge`` writes, planted so
that they carry the synthetic dataset's preferences.

An item's vector points along its genres' directions; a user's along the genres they rate above
their own mean, measured over all their ratings (so it knows more than the history before any one
sample, as an LLM's world knowledge would), plus noise. A share of users gets no vector.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

META = {"encoder": "planted-test-encoder", "cutoff_timestamp": 0, "max_new_tokens": 64,
        "prompts": {"item": "Introduce {title}.", "user": "Describe the user's taste."},
        "generator": {"model": "tiny", "temperature": 0.0}}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def planted_vectors(data, dim: int = 32, seed: int = 0, noise: float = 0.3,
                    missing: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item_vectors, user_vectors, user_has) for a PreparedData, rows by dense id, row 0 zeros."""
    rng = np.random.default_rng(seed)
    items, users, events = data.items, data.users, data.events
    genres = sorted({g for text in items["genres"].fillna("") for g in str(text).split("|") if g})
    if dim < len(genres):
        raise ValueError(f"dim {dim} is below the {len(genres)} genres")
    codes = np.linalg.qr(rng.normal(size=(dim, len(genres))))[0].T  # orthonormal direction per genre
    member = np.zeros((int(items["item_idx"].max()) + 1, len(genres)), np.float32)
    for idx, text in zip(items["item_idx"], items["genres"].fillna("")):
        for g in filter(None, str(text).split("|")):
            member[idx, genres.index(g)] = 1.0
    item_vectors = _unit(member @ codes + noise * rng.normal(size=(len(member), dim)) / np.sqrt(dim))
    item_vectors[0] = 0

    n_users = int(users["user_idx"].max()) + 1
    u, it = events["user_idx"].to_numpy(), events["item_idx"].to_numpy()
    centred = events["rating"].to_numpy(np.float64) - events.groupby("user_idx")["rating"].transform("mean").to_numpy()
    taste, counts = np.zeros((n_users, len(genres))), np.zeros((n_users, len(genres)))
    np.add.at(taste, u, member[it] * centred[:, None])
    np.add.at(counts, u, member[it])
    taste /= np.maximum(counts, 1)
    user_vectors = _unit(taste @ codes + noise * rng.normal(size=(n_users, dim)) / np.sqrt(dim))
    user_has = rng.uniform(size=n_users) >= missing
    user_has[0] = False
    user_vectors[~user_has] = 0
    return item_vectors.astype(np.float32), user_vectors.astype(np.float32), user_has


def write_knowledge(directory: Path, item_vectors: np.ndarray, user_vectors: np.ndarray, user_has: np.ndarray,
                    **meta) -> Path:
    """A knowledge directory with these arrays and ``knowledge.json`` (META, ``dim``, ``meta`` overrides)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "item_vectors.npy", item_vectors)
    np.save(directory / "user_vectors.npy", user_vectors)
    np.save(directory / "user_has.npy", user_has)
    (directory / "knowledge.json").write_text(json.dumps({**META, "dim": int(item_vectors.shape[1]), **meta}))
    return directory


def fabricate_knowledge(data, directory: Path, dim: int = 32, seed: int = 0, **kwargs) -> Path:
    """A planted knowledge directory for ``data`` (see ``planted_vectors``)."""
    return write_knowledge(directory, *planted_vectors(data, dim, seed, **kwargs))
