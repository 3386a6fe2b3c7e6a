"""AUC by slice: each sample in exactly one bucket per dimension, AUCs and paired differences
equal to the whole-split functions on the slice's rows, and slices too small left unscored."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.metrics import binary_metrics, paired_auc_difference
from training.slices import SampleSlices, llm_beats_reference, slice_aucs, slice_markdown, slice_table


def planted(n: int = 600, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], SampleSlices]:
    """A CRM that ranks well-supported items and an LLM that ranks cold ones (support < 10)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    support = rng.choice([0, 3, 20, 200], n)
    cold = support < 10
    crm = np.where(cold, rng.random(n), y + rng.normal(0, 0.8, n))
    llm = np.where(cold, y + rng.normal(0, 0.8, n), rng.random(n))
    slices = SampleSlices(support, rng.choice([0, 5], n), rng.integers(1, 300, n))
    return y, {"CRM": crm, "LLM": llm}, slices


def test_every_sample_is_in_one_bucket_of_each_dimension():
    _, _, slices = planted()
    groups = slices.groups()
    for dimension in ("item support", "user support", "history length"):
        masks = np.stack([m for d, _, m in groups if d == dimension])
        assert (masks.sum(0) == 1).all()
    assert [b for d, b, _ in groups if d == "item support"] == ["0", "1-9", "10-49", "50+"]
    assert [b for d, b, _ in groups if d == "history length"] == ["<10", "10-29", "30-99", "100+"]


def test_slice_aucs_are_the_metrics_of_the_slices_rows_and_name_where_the_llm_helps():
    y, scores, slices = planted()
    rows = slice_table(y, scores, slices, reference="CRM")
    cold = next(r for r in rows if r["slice"] == "0")
    mask = slices.item_support == 0
    assert cold["n"] == int(mask.sum()) and cold["positives"] == int(y[mask].sum())
    assert cold["models"]["LLM"]["auc"] == binary_metrics(y[mask], scores["LLM"][mask])["auc"]
    diff, se = paired_auc_difference(y[mask], scores["CRM"][mask], scores["LLM"][mask])
    assert (cold["models"]["LLM"]["diff"], cold["models"]["LLM"]["diff_se"]) == (diff, se)
    assert "diff" not in cold["models"]["CRM"]
    beats = llm_beats_reference(rows, "LLM")
    assert [b for b in beats if b.startswith("item support")] == ["item support: 0", "item support: 1-9"]
    table = slice_markdown(rows, "CRM")
    assert "| item support | 0 |" in table and "paired" in table


def test_a_slice_with_too_few_of_a_label_reports_counts_only():
    y, scores, slices = planted(n=200)
    y = y.copy()
    y[slices.item_support == 0] = 1
    row = next(r for r in slice_table(y, scores, slices) if r["slice"] == "0")
    assert row["models"] == {} and row["n"] == row["positives"] > 0
    one = slice_aucs(y, scores["LLM"], slices)
    assert one["item support: 0"]["auc"] is None and one["item support: 50+"]["auc"] is not None


def test_support_is_counted_on_the_training_split(world):
    data = world.data
    valid = data.split("valid")
    slices = SampleSlices.of(data, valid)
    train = data.split("train")
    for row, support in zip(valid.itertuples(), slices.item_support):
        assert support == int((train["item_idx"] == row.item_idx).sum())
    users = pd.Series(slices.user_support)
    assert ((users == 0) == ~valid["user_idx"].isin(train["user_idx"]).to_numpy()).all()
