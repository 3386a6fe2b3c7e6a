"""The LLM report keeps each model's scores: a rerun reads back what still matches and scores only
the rest, and a changed model, subset or dtype is scored again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from training.llm.offline_scoring import LLMScorer
from training.llm.report import SCORES_DIR, kept_scores, run_report


def counting_scores(monkeypatch) -> list[int]:
    """Count the prompts LLMScorer.score is asked for (the real scoring still runs)."""
    scored: list[int] = []
    real = LLMScorer.score

    def score(self, prompts, user_reps, batch_size=16, item_reps=None):
        scored.append(len(prompts))
        return real(self, prompts, user_reps, batch_size, item_reps)

    monkeypatch.setattr(LLMScorer, "score", score)
    return scored


def test_a_rerun_reads_kept_scores_and_rescores_a_retrained_model(world, tmp_path: Path, monkeypatch) -> None:
    lora = tmp_path / "lora"
    lora.mkdir()
    for f in (world.root / "lora").iterdir():
        if f.is_file():
            (lora / f.name).write_bytes(f.read_bytes())
    args = (world.data_dir, world.crm_dir, world.base_dir, None, lora, tmp_path / "report")
    kwargs = dict(n_test=40, n_valid=60, k_text=3)
    scored = counting_scores(monkeypatch)

    first = run_report(*args, **kwargs)
    assert scored == [40, 60, 40, 60]  # RecLoRA (trained first), then zero-shot; test then valid
    assert sorted(p.name for p in (tmp_path / "report" / SCORES_DIR).iterdir()) == [
        "reclora-personalized-lora.json", "reclora-personalized-lora.test.npy",
        "reclora-personalized-lora.valid.npy", "zero-shot-llm.json", "zero-shot-llm.test.npy",
        "zero-shot-llm.valid.npy"]
    assert [r["model"] for r in first["rows"]] == ["CRM", "zero-shot LLM", "RecLoRA (personalized LoRA)",
                                                  "fused (RecLoRA + CRM)"]
    slices = first["slices"]  # every model's test AUC by slice, the difference to the CRM beside it
    assert sum(r["n"] for r in slices if r["dimension"] == "user support") == 40
    assert set(first["beats_crm"]) == {"zero-shot LLM", "RecLoRA (personalized LoRA)", "fused (RecLoRA + CRM)"}
    assert "## Test subset by slice" in (tmp_path / "report" / "report.md").read_text()

    scored.clear()
    again = run_report(*args, **kwargs)
    assert scored == []  # nothing scored again
    llm_rows = lambda result: [r for r in result["rows"] if r["model"] != "CRM"]  # noqa: E731 (CRM: rerun)
    assert llm_rows(again) == llm_rows(first)  # same figures, scoring seconds as first measured

    weights = next(f for f in lora.iterdir() if f.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    run_report(*args, **kwargs)
    assert scored == [40, 60]  # the retrained LoRA only; the zero-shot scores still hold

    scored.clear()
    run_report(*args, **{**kwargs, "n_test": 30})
    assert scored == [30, 60, 30, 60]  # another subset: every model again


def test_kept_scores_never_vouch_for_arrays_of_another_record(tmp_path: Path) -> None:
    record = {"model": "RecLoRA (personalized LoRA)", "dtype": "float32"}
    sizes = {"test": 3, "valid": 2}
    fresh = {"test": np.array([0.1, 0.2, 0.3]), "valid": np.array([0.4, 0.5])}
    scores, _ = kept_scores(tmp_path, record, sizes, lambda: fresh)
    assert all(np.array_equal(scores[s], fresh[s]) for s in sizes)
    assert kept_scores(tmp_path, record, sizes, lambda: pytest.fail("kept scores were not read back"))[0]["valid"][1] == 0.5

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # another record starts over, then stops mid-way
        kept_scores(tmp_path, {**record, "dtype": "bfloat16"}, sizes, interrupted)
    meta = tmp_path / "recLoRA-personalized-lora.json".lower()
    assert json.loads(meta.read_text())["record"] == record  # untouched until arrays are replaced
    np.save(tmp_path / "recLoRA-personalized-lora.test.npy".lower(), np.zeros(2), allow_pickle=False)
    again, _ = kept_scores(tmp_path, record, sizes, lambda: fresh)  # wrong length: scored again
    assert np.array_equal(again["test"], fresh["test"])
