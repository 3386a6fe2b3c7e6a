"""The papers' offline metrics: AUC, LogLoss and accuracy at 0.5 (sklearn, as the authors use)."""

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
