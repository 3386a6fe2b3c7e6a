"""AUC by slice: where an LLM can add to a CRM, read apart from where it cannot.

The literature finds LLMs complementary to CRMs mainly on cold items and users and in low-data
regimes, and one AUC over a whole split hides that. A sample's slices: its item's training support
(the item's interactions in the training split: 0, 1-9, 10-49, 50+, the buckets a slice-aware
fusion serves by, ``service.model.fusion.ITEM_SUPPORT_EDGES``), its user's (none or some: in a
chronological split most later users have none) and its history's length. Support is always
counted on the whole training split, so every report's slices are the same samples whatever
share of the data a model was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from service.model.fusion import ITEM_SUPPORT_EDGES, support_buckets, support_labels
from training.data.samples import PreparedData
from training.metrics import auc_standard_error, binary_metrics, paired_auc_difference

HISTORY_EDGES = (10, 30, 100)  # behaviours before the sample: <10, 10-29, 30-99, 100+
USER_SUPPORT = ("none", "some")
MIN_PER_CLASS = 2  # fewer positives or negatives than this: the slice's AUC is not reported


def training_support(data: PreparedData, column: str) -> pd.Series:
    """Training-split interactions per ``item_idx`` or ``user_idx``."""
    return data.split("train").groupby(column).size()


def _edge_labels(edges: tuple[int, ...]) -> tuple[str, ...]:
    inner = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
    return (f"<{edges[0]}", *inner, f"{edges[-1]}+")


@dataclass(frozen=True)
class SampleSlices:
    """Each sample's bucket on every slice dimension, in the samples' order."""

    item_support: np.ndarray  # (N,) training interactions of the sample's item
    user_support: np.ndarray  # (N,) training interactions of the sample's user
    history_length: np.ndarray  # (N,) behaviours in the sample's history

    @classmethod
    def of(cls, data: PreparedData, samples: pd.DataFrame) -> "SampleSlices":
        items, users = training_support(data, "item_idx"), training_support(data, "user_idx")
        return cls(samples["item_idx"].map(items).fillna(0).to_numpy(np.int64),
                   samples["user_idx"].map(users).fillna(0).to_numpy(np.int64),
                   samples["hist_len"].to_numpy(np.int64))

    def __len__(self) -> int:
        return len(self.item_support)

    def groups(self) -> list[tuple[str, str, np.ndarray]]:
        """(dimension, bucket, mask) for every bucket of every dimension, in a fixed order."""
        out: list[tuple[str, str, np.ndarray]] = []
        items = support_buckets(self.item_support)
        out += [("item support", label, items == b) for b, label in enumerate(support_labels())]
        out += [("user support", label, mask) for label, mask in
                zip(USER_SUPPORT, (self.user_support == 0, self.user_support > 0))]
        history = np.searchsorted(np.asarray(HISTORY_EDGES), self.history_length, side="right")
        out += [("history length", label, history == b) for b, label in enumerate(_edge_labels(HISTORY_EDGES))]
        return out


def slice_table(labels: np.ndarray, scores: Mapping[str, np.ndarray], slices: SampleSlices,
                reference: str | None = None) -> list[dict]:
    """One row per slice: its count and positives, and per model the AUC with its standard error
    (Hanley-McNeil), and the paired difference to ``reference`` with DeLong's standard error; a
    slice with fewer than ``MIN_PER_CLASS`` of either label reports counts only."""
    y = np.asarray(labels).astype(int)
    if len(y) != len(slices) or any(len(s) != len(y) for s in scores.values()):
        raise ValueError(f"labels ({len(y)}), slices ({len(slices)}) and every model's scores must have one row "
                         "per sample")
    rows = []
    for dimension, bucket, mask in slices.groups():
        ys, n_pos = y[mask], int(y[mask].sum())
        row: dict = {"dimension": dimension, "slice": bucket, "n": int(mask.sum()), "positives": n_pos, "models": {}}
        if min(n_pos, len(ys) - n_pos) >= MIN_PER_CLASS:
            for name, s in scores.items():
                auc = binary_metrics(ys, np.asarray(s)[mask])["auc"]
                entry = {"auc": auc, "se": auc_standard_error(auc, n_pos, len(ys) - n_pos)}
                if reference is not None and name != reference:
                    diff, se = paired_auc_difference(ys, np.asarray(scores[reference])[mask], np.asarray(s)[mask])
                    entry |= {"diff": diff, "diff_se": se}
                row["models"][name] = entry
        rows.append(row)
    return rows


def slice_aucs(labels: np.ndarray, probs: np.ndarray, slices: SampleSlices) -> dict[str, dict]:
    """One model's slice AUCs, keyed "dimension: slice": n, positives, and AUC with its standard error
    (None where the slice has too few of a label)."""
    out = {}
    for row in slice_table(labels, {"model": probs}, slices):
        m = row["models"].get("model")
        out[f"{row['dimension']}: {row['slice']}"] = {"n": row["n"], "positives": row["positives"],
                                                       "auc": m and m["auc"], "se": m and m["se"]}
    return out


def slice_markdown(rows: list[dict], reference: str | None = None) -> str:
    """The slice table as markdown: AUC ± SE per model, and the difference to ``reference`` ± its
    paired SE where one was computed."""
    models = list(dict.fromkeys(name for r in rows for name in r["models"]))
    head = ["dimension", "slice", "n", "positives", *models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dimension"], r["slice"], str(r["n"]), str(r["positives"])]
        for name in models:
            m = r["models"].get(name)
            if m is None:
                cells.append("-")
                continue
            cell = f"{m['auc']:.4f} ± {m['se']:.4f}"
            if "diff" in m:
                cell += f" ({m['diff']:+.4f} ± {m['diff_se']:.4f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    note = f" In brackets: the difference to {reference} with its paired (DeLong) standard error." if reference else ""
    return (f"AUC ± standard error by slice; item support counts the item's training interactions (buckets "
            f"{', '.join(support_labels())}).{note}\n\n" + "\n".join(lines) + "\n")


def llm_beats_reference(rows: list[dict], model: str) -> list[str]:
    """The slices where ``model``'s paired difference to the reference is above zero by more than
    one standard error ("dimension: slice")."""
    return [f"{r['dimension']}: {r['slice']}" for r in rows
            if (m := r["models"].get(model)) and "diff" in m and m["diff"] > m["diff_se"]]


__all__ = ["ITEM_SUPPORT_EDGES", "SampleSlices", "slice_table", "slice_aucs", "slice_markdown", "training_support",
           "llm_beats_reference"]
