"""The papers' offline metrics: AUC, LogLoss and accuracy at 0.5 (sklearn, as the authors use), and
the standard error of an AUC, which says which differences a validation subset can tell apart."""

from __future__ import annotations

import numpy as np
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
