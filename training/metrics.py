"""The papers' offline metrics: AUC, LogLoss and accuracy at 0.5 (sklearn, as the authors use), and
the standard error of an AUC, which says which differences a validation subset can tell apart."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, LogLoss and ACC@0.5 for labels in {0, 1} and probabilities P(label = 1)."""
    y = np.asarray(labels).astype(int)
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    if len(np.unique(y)) < 2:
        raise ValueError("AUC needs both positive and negative labels")
    return {
        "auc": float(roc_auc_score(y, p)),
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "acc": float(accuracy_score(y, p > 0.5)),
        "n": int(len(y)),
    }


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUC measured on ``n_pos`` positives and
    ``n_neg`` negatives: within a tenth of a bootstrap's at ML-100K's label balance, wider where the
    labels are unbalanced (tests/training/test_training_metrics.py). Written out because it needs only the
    AUC and the two counts, where sklearn and scipy offer none and a bootstrap would need every
    run's per-sample scores."""
    if n_pos < 1 or n_neg < 1:
        raise ValueError("an AUC's standard error needs at least one positive and one negative")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def paired_auc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """AUC(b) - AUC(a) of two scorings of the same samples, and its standard error by DeLong,
    DeLong and Clarke-Pearson (1988): the two AUCs' covariance over the same positives and
    negatives is taken out, so a small difference between correlated scorers can be told apart
    where two unpaired errors could not. Written out (Sun and Xu's midrank form) because sklearn
    and scipy offer no paired AUC test."""
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        raise ValueError("a paired AUC difference needs both positive and negative labels")
    scores = np.stack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.stack([rankdata(p) for p in pos])
    ty = np.stack([rankdata(q) for q in neg])
    tz = np.stack([rankdata(s) for s in np.concatenate([pos, neg], 1)])
    aucs = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n  # each positive's share of negatives ranked below it
    v10 = 1.0 - (tz[:, m:] - ty) / m  # each negative's share of positives ranked above it
    cov = np.cov(v01) / m + np.cov(v10) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return float(aucs[1] - aucs[0]), float(np.sqrt(max(var, 0.0)))
