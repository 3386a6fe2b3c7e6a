"""The prompt-forms study says what the export's rule (``fusion_fit.decide``) would serve."""

from __future__ import annotations

import numpy as np

from training.slices import SampleSlices
from training.studies.prompt_forms import SPLITS, fused_scores


def test_what_is_served_follows_the_exports_rule_on_the_same_scores() -> None:
    """An LLM that knows only the cold items, a CRM that knows only the others: the fusion by item
    support wins validation and is what the study reports as served."""
    rng = np.random.default_rng(0)
    n = 2000
    labels, crm, probs, slices = {}, {}, {}, {}
    for split in SPLITS:
        y = rng.integers(0, 2, n)
        support = np.where(rng.random(n) < 0.3, 0, 100)
        cold = support == 0
        noise = rng.random(n)
        labels[split] = y
        crm[split] = np.clip(np.where(cold, noise, 0.3 + 0.4 * y + 0.2 * (noise - 0.5)), 0.01, 0.99)
        probs[split] = np.clip(np.where(cold, 0.3 + 0.4 * y + 0.2 * (noise - 0.5), 0.5), 0.01, 0.99)
        slices[split] = SampleSlices(support, np.zeros(n, np.int64), np.full(n, 20))
    fused = fused_scores({"lora": {"probs": probs}}, labels, crm, 0, slices)
    assert fused["lora"]["serves"] == "by_support"
