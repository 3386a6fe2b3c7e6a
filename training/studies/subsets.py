"""Seeded training-subsets of a prepared dataset, as views that share everything but the samples.

Subsets are nested per seed: one permutation of the training samples per seed, and a subset of
size n is its first n, so for one seed the 1% subset lies inside the 5% one, which lies inside
the 10% one. Comparisons across fractions then differ by added data only, not by a fresh draw.
Validation and test samples, events, users and items are those of the full dataset.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from training.data.samples import SPLITS, PreparedData


def subset_size(fraction: float, n_train: int) -> int:
    """Training samples for ``fraction`` of ``n_train`` (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a training fraction must be in (0, 1], got {fraction}")
    return max(1, min(n_train, int(round(fraction * n_train))))


def train_subset(data: PreparedData, n: int, seed: int) -> PreparedData:
    """A view of ``data`` whose train split is ``n`` seeded samples of it (nested in ``n`` per seed).

    Only the samples table is new (train rows filtered, every other row kept, original order);
    events, users and items are the same objects.
    """
    is_train = (data.samples["split"] == "train").to_numpy()
    positions = np.flatnonzero(is_train)
    if not 1 <= n <= len(positions):
        raise ValueError(f"a training subset needs 1..{len(positions)} samples, got {n}")
    chosen = positions[np.random.default_rng(seed).permutation(len(positions))[:n]]
    keep = ~is_train
    keep[chosen] = True
    samples = data.samples[keep].reset_index(drop=True)
    meta = {**data.meta, "n_samples": {s: int((samples["split"] == s).sum()) for s in SPLITS},
            "train_subset": {"n": n, "of": len(positions), "seed": seed}}
    return dataclasses.replace(data, samples=samples, meta=meta)


def shared_test_subset(data: PreparedData, n_test: int, seed: int) -> pd.DataFrame:
    """The seeded test subset ``reclora llm-report`` scores (same draw for the same n and seed)."""
    test = data.split("test")
    return test.sample(n=min(n_test, len(test)), random_state=seed)
