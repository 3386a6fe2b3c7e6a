"""The training objectives end to end on a tiny random Llama and synthetic data: the default
(answer) writes what it always wrote, packed or padded alike; the fused one trains w and b and
writes the fusion serving applies."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from service.model.fusion import FUSION_FILE, Fusion
from training.cli import app
from training.llm.crm_outputs import crm_probabilities, user_representations
from training.llm.loading import load_trained
from training.llm.train import LLMTrainConfig, train_llm
from training.metrics import binary_metrics

SUMMARY_KEYS = {"config", "lora", "prompt", "best_valid_auc", "history", "train_seconds", "instances"}
HISTORY_KEYS = {"step", "epoch", "train_loss", "valid_auc", "seconds"}


def config(**overrides) -> LLMTrainConfig:
    values = dict(n_samples=32, k_text=3, epochs=2, batch_size=8, grad_accum=2, lr=5e-3, valid_samples=32,
                  evals_per_epoch=1, dtype="float32", device="cpu", progress=False,
                  lora=dict(n_meta=4, user_dim=64, r=4, lora_alpha=8))
    return LLMTrainConfig(**{**values, **overrides})


def test_the_default_objective_writes_what_it_wrote_before(llm_world) -> None:
    root, data, emb, base = llm_world
    runs = {}
    for packing in (False, True):  # False: the right-padded loop as it was
        out = root / f"answer-{packing}"
        summary = train_llm(data, emb, root / "crm", base, out, config(packing=packing))
        assert {p.name for p in out.iterdir()} == {"config.json", "train.json", "weights.safetensors"}
        written = json.loads((out / "train.json").read_text())
        assert set(written) == SUMMARY_KEYS and "objective" not in written
        assert all(set(h) == HISTORY_KEYS for h in written["history"]) and written["instances"] == 64
        runs[packing] = summary, load_file(out / "weights.safetensors")
    (padded, padded_w), (packed, packed_w) = runs[False], runs[True]
    assert [h["train_loss"] for h in packed["history"]] == pytest.approx([h["train_loss"] for h in padded["history"]],
                                                                         rel=1e-5)
    assert packed["best_valid_auc"] == pytest.approx(padded["best_valid_auc"], abs=1e-6)
    assert packed_w.keys() == padded_w.keys()
    for key, weight in padded_w.items():
        torch.testing.assert_close(packed_w[key], weight, rtol=1e-4, atol=1e-4 * float(weight.abs().max()), msg=key)


def test_the_fused_objective_trains_and_writes_the_served_fusion(llm_world) -> None:
    root, data, emb, base = llm_world
    out = root / "fused"
    cfg = config(objective="fused", epochs=3)
    summary = train_llm(data, emb, root / "crm", base, out, cfg)
    written = json.loads((out / FUSION_FILE).read_text())
    fusion = Fusion.from_json(written)
    assert fusion.w_llm == 1.0 and (fusion.w_crm, fusion.bias) != (1.0, 0.0)  # w and b were trained
    train = json.loads((out / "train.json").read_text())
    assert train["objective"] == "fused" and train["fusion"] == written and train["config"]["objective"] == "fused"
    losses = [h["train_loss"] for h in train["history"]]
    assert losses[-1] < losses[0], losses
    assert all({"valid_auc", "valid_llm_auc", "fusion"} <= set(h) for h in train["history"])

    # selected on the fused validation AUC of what serving computes: the saved LoRA, fused by fusion.json
    valid = data.split("valid").sample(n=cfg.valid_samples, random_state=cfg.seed)
    scorer = load_trained(out, base, "float32", k_text=cfg.k_text, device="cpu")
    p_llm = scorer.score(scorer.prompts(data, valid, emb, "semantic"), user_representations(data, valid, root / "crm", emb))
    fused = fusion(p_llm, crm_probabilities(data, valid, root / "crm", emb))
    assert binary_metrics(valid["label"].to_numpy(), fused)["auc"] == pytest.approx(summary["best_valid_auc"], abs=1e-6)


def test_the_command_refuses_an_unknown_objective(llm_world, tmp_path) -> None:
    root, *_ = llm_world
    result = CliRunner().invoke(app, ["train-llm", "--data", str(root), "--base-model", str(root / "base"),
                                      "--out", str(tmp_path / "out"), "--objective", "margin"])
    assert result.exit_code == 2 and "objective must be one of answer, fused" in result.output
    assert not (tmp_path / "out").exists()


def test_the_shared_form_on_requests_of_20_is_the_default_and_per_target_takes_single_samples() -> None:
    import inspect

    from training.llm.commands import SHARED_REQUEST_SIZE, default_request_size, sweep, train_llm

    for command in (train_llm, sweep):
        params = inspect.signature(command).parameters
        assert params["prompt_form"].default == "shared" and params["request_size"].default is None
    assert SHARED_REQUEST_SIZE == 20
    assert default_request_size("shared", None) == 20 and default_request_size("per-target", None) == 1
    assert default_request_size("per_target", 1) == 1 and default_request_size("shared", 5) == 5


def test_requests_of_several_samples_are_refused_with_the_per_target_form(llm_world, tmp_path) -> None:
    root, *_ = llm_world
    result = CliRunner().invoke(app, ["train-llm", "--data", str(root), "--base-model", str(root / "base"),
                                      "--out", str(tmp_path / "out"), "--prompt-form", "per-target",
                                      "--request-size", "5"])
    assert result.exit_code == 2 and "requests of several candidates train the shared prompt form" in result.output
    assert not (tmp_path / "out").exists()
