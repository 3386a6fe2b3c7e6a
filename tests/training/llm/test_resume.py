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


@pytest.mark.parametrize(("objective", "stops"), [("answer", (3, 3)), ("fused", (3, 3)), ("answer", (4,))])
def test_a_stopped_run_resumes_to_the_same_weights(llm_world, objective, stops) -> None:
    """Stops mid-epoch (3, then 6) or exactly at the epoch's end (4)."""
    root, data, emb, base = llm_world
    cfg = _config(objective)
    whole_dir = root / f"whole-{objective}"
    whole = (json.loads((whole_dir / "train.json").read_text()) if (whole_dir / "train.json").is_file()
             else train_llm(data, emb, root / "crm", base, whole_dir, cfg))

    out = root / f"stopped-{objective}-{'-'.join(map(str, stops))}"
    done = 0
    for n in stops:
        partial = train_llm(data, emb, root / "crm", base, out, cfg, stop_after_steps=n)
        done += n
        assert partial["finished"] is False and partial["step"] == done
        assert (out / RESUME_DIR).is_dir() and not (out / "train.json").exists()
    rest = train_llm(data, emb, root / "crm", base, out, cfg)

    assert not (out / RESUME_DIR).exists()  # a finished run keeps no mid-run state
    assert [h["valid_auc"] for h in rest["history"]] == [h["valid_auc"] for h in whole["history"]]
    assert [h["train_loss"] for h in rest["history"]] == pytest.approx(
        [h["train_loss"] for h in whole["history"]], rel=1e-6)
    a = load_file(whole_dir / "weights.safetensors")
    b = load_file(out / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    if objective == "fused":
        assert json.loads((out / "fusion.json").read_text()) == json.loads(
            (whole_dir / "fusion.json").read_text())


def test_a_stopped_run_with_other_settings_is_refused(llm_world) -> None:
    root, data, emb, base = llm_world
    out = root / "refused"
    train_llm(data, emb, root / "crm", base, out, _config("answer"), stop_after_steps=1)
    other = _config("answer")
    other.lr = 1e-2
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        train_llm(data, emb, root / "crm", base, out, other)
