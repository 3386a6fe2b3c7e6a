"""A stopped training run continues where it stopped, exactly as if it had never stopped."""

import json

import pytest
import torch
from safetensors.torch import load_file

from training.llm.resume import RESUME_DIR
from training.llm.train import LLMTrainConfig, train_llm


def _config(objective: str) -> LLMTrainConfig:
    # 2 epochs of 4 steps, evaluated twice per epoch: the stop falls mid-epoch and the resumed run
    # crosses an epoch boundary (a new instance order from the restored generator).
    return LLMTrainConfig(n_samples=32, k_text=3, epochs=2, batch_size=4, grad_accum=4, lr=5e-3, valid_samples=24,
                          evals_per_epoch=2, dtype="float32", progress=False, objective=objective,
                          lora=dict(r=4, lora_alpha=8.0, n_meta=2, gated=True))


@pytest.mark.parametrize("objective", ["answer", "fused"])
def test_a_stopped_run_resumes_to_the_same_weights(llm_world, objective) -> None:
    root, data, emb, base = llm_world
    cfg = _config(objective)
    whole = train_llm(data, emb, root / "crm", base, root / f"whole-{objective}", cfg)

    out = root / f"stopped-{objective}"
    first = train_llm(data, emb, root / "crm", base, out, cfg, stop_after_steps=3)
    assert first["finished"] is False and first["step"] == 3
    assert (out / RESUME_DIR).is_dir() and not (out / "train.json").exists()
    second = train_llm(data, emb, root / "crm", base, out, cfg, stop_after_steps=3)
    assert second["step"] == 6
    rest = train_llm(data, emb, root / "crm", base, out, cfg)

    assert not (out / RESUME_DIR).exists()  # a finished run keeps no mid-run state
    assert [h["valid_auc"] for h in rest["history"]] == [h["valid_auc"] for h in whole["history"]]
    assert [h["train_loss"] for h in rest["history"]] == pytest.approx(
        [h["train_loss"] for h in whole["history"]], rel=1e-6)
    a = load_file(root / f"whole-{objective}" / "weights.safetensors")
    b = load_file(out / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    if objective == "fused":
        assert json.loads((out / "fusion.json").read_text()) == json.loads(
            (root / f"whole-{objective}" / "fusion.json").read_text())


def test_a_stopped_run_with_other_settings_is_refused(llm_world) -> None:
    root, data, emb, base = llm_world
    out = root / "refused"
    train_llm(data, emb, root / "crm", base, out, _config("answer"), stop_after_steps=1)
    other = _config("answer")
    other.lr = 1e-2
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        train_llm(data, emb, root / "crm", base, out, other)
