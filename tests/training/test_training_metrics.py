"""The AUC's standard error against a bootstrap of the same scores: what the sweep's "told apart"
rests on."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.metrics import auc_standard_error, paired_auc_difference


def bootstrap(shift: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """(AUC, bootstrap standard error) of binormal scores: positives shifted by ``shift``."""
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(shift, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    boot = [roc_auc_score(y, np.r_[rng.choice(pos, n_pos), rng.choice(neg, n_neg)]) for _ in range(400)]
    return roc_auc_score(y, np.r_[pos, neg]), float(np.std(boot))


@pytest.mark.parametrize("shift", [0.0, 0.4, 0.7, 1.5])
def test_the_standard_error_matches_a_bootstrap_on_a_validation_sized_draw(shift: float) -> None:
    auc, boot = bootstrap(shift, 220, 180)  # AUC 0.54-0.88 on 400 samples, ML-100K's label balance
    assert auc_standard_error(auc, 220, 180) == pytest.approx(boot, rel=0.1)


def test_with_unbalanced_labels_it_errs_on_the_wide_side() -> None:
    for shift in (0.7, 1.5):
        auc, boot = bootstrap(shift, 60, 340)
        assert boot <= auc_standard_error(auc, 60, 340) <= 1.5 * boot


def test_the_standard_error_shrinks_with_samples_and_needs_both_labels() -> None:
    assert auc_standard_error(0.68, 880, 720) == pytest.approx(auc_standard_error(0.68, 220, 180) / 2, rel=0.02)
    assert auc_standard_error(1.0, 50, 50) == 0.0
    with pytest.raises(ValueError, match="positive and one negative"):
        auc_standard_error(0.7, 0, 10)


def _delong_by_definition(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong's structural components from every (positive, negative) pair, ties counted half."""
    y = labels.astype(bool)

    def components(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        return psi.mean(1), psi.mean(0)

    (va, wa), (vb, wb) = components(a), components(b)
    m, n = y.sum(), (~y).sum()
    var = (np.var(vb - va, ddof=1) / m) + (np.var(wb - wa, ddof=1) / n)
    return float(vb.mean() - va.mean()), float(np.sqrt(var))


def test_paired_auc_difference_is_delongs() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.55).astype(int)
    a = np.round(y + rng.normal(0, 1.5, 300), 1)  # rounded: ties within and across the classes
    b = np.round(a + rng.normal(0, 0.6, 300) + 0.2 * y, 1)
    diff, se = paired_auc_difference(y, a, b)
    assert diff == pytest.approx(roc_auc_score(y, b) - roc_auc_score(y, a), abs=1e-12)
    assert (diff, se) == pytest.approx(_delong_by_definition(y, a, b), rel=1e-9)
    assert paired_auc_difference(y, a, a) == (0.0, 0.0)
    correlated = auc_standard_error(roc_auc_score(y, a), int(y.sum()), int(len(y) - y.sum()))
    assert se < correlated  # pairing removes what the two scorings share
    with pytest.raises(ValueError):
        paired_auc_difference(np.ones(5), a[:5], b[:5])
