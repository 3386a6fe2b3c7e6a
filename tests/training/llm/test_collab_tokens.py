"""Collaborative tokens in training: the prompts carry the placeholders, the projector learns with
the LoRA, the run saves it, and a run without them is the run it was."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from service.llm.prompt import PromptBuilder, PromptConfig
from training.llm.loading import load_trained
from training.llm.prompts import request_prompts, sample_prompts
from training.llm.requests import user_requests
from training.llm.train import LLMTrainConfig, build_model, build_optimization, prepare_samples, train_llm
from training.llm.train_step import accumulate_step

TINY = dict(n_samples=32, k_text=3, epochs=1, batch_size=8, grad_accum=1, lr=5e-3, valid_samples=16,
            evals_per_epoch=1, dtype="float32", device="cpu", progress=False,
            lora=dict(n_meta=2, user_dim=64, r=4, lora_alpha=8))


def test_prompts_carry_one_user_and_one_item_placeholder(llm_world) -> None:
    _, data, emb, base = llm_world
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = user_requests(data.split("train").head(40), 4)
    for form in ("per_target", "shared"):
        plain = PromptBuilder(tokenizer, PromptConfig(form=form))
        collab = PromptBuilder(tokenizer, PromptConfig(form=form, collab_tokens=True))
        assert collab.config.version != plain.config.version  # never one score cache or fingerprint
        p = collab.collab_id
        assert p is not None and plain.collab_id is None
        for a, b in zip(request_prompts(data, rows, plain, emb, 3, "semantic"),
                        request_prompts(data, rows, collab, emb, 3, "semantic")):
            assert b.prefix == a.prefix + [p]  # the user token closes the prefix
            for s_a, s_b in zip(a.suffixes, b.suffixes):
                at = s_b.index(p)
                assert s_b.count(p) == 1 and s_b[:at] + s_b[at + 1:] == s_a
                assert s_b[-1] == s_a[-1]  # the answer position stays the suffix's last token
        single = sample_prompts(data, rows.head(3), collab, emb, 3, "recent")
        assert all(x.count(p) == 2 for x in single)


def test_a_run_without_collab_tokens_is_unchanged(llm_world) -> None:
    """The switch off: the same first step's loss as a config that never heard of it."""
    root, data, emb, base = llm_world
    losses = []
    for cfg in (LLMTrainConfig(**TINY), LLMTrainConfig(**TINY, collab_tokens=False)):
        torch.manual_seed(0)
        model = build_model(base, data, cfg)
        samples = prepare_samples(data, emb, root / "crm", cfg, model.scorer)
        assert samples.instances.collab is None and model.scorer.collab is None
        opt = build_optimization(cfg, model, samples.instances)
        losses.append(accumulate_step(model.model, model.lora, opt.loss_fn, samples.instances, list(range(8)), cfg,
                                      model.scorer.pad_id)[0])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("packing", [True, False])
def test_the_projector_gets_gradients_and_is_in_the_optimizer(llm_world, packing) -> None:
    root, data, emb, base = llm_world
    cfg = LLMTrainConfig(**TINY, collab_tokens=True, packing=packing)
    model = build_model(base, data, cfg)
    samples = prepare_samples(data, emb, root / "crm", cfg, model.scorer)
    projector = model.scorer.collab
    assert projector is not None and samples.instances.collab.projector is projector
    opt = build_optimization(cfg, model, samples.instances)
    optimized = {id(p) for group in opt.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in projector.parameters())
    accumulate_step(model.model, model.lora, opt.loss_fn, samples.instances, list(range(8)), cfg, model.scorer.pad_id)
    for mlp in (projector.user, projector.item):
        assert mlp[-1].weight.grad is not None and mlp[-1].weight.grad.abs().sum() > 0


def test_shared_requests_train_with_collab_tokens(llm_world) -> None:
    root, data, emb, base = llm_world
    cfg = LLMTrainConfig(**{**TINY, "n_samples": 40}, collab_tokens=True, prompt_form="shared", request_size=4)
    model = build_model(base, data, cfg)
    samples = prepare_samples(data, emb, root / "crm", cfg, model.scorer)
    opt = build_optimization(cfg, model, samples.instances)
    loss, _ = accumulate_step(model.model, model.lora, opt.loss_fn, samples.instances, list(range(3)), cfg,
                              model.scorer.pad_id)
    assert np.isfinite(loss)
    assert model.scorer.collab.item[-1].weight.grad.abs().sum() > 0


def test_a_trained_run_saves_and_loads_its_projector(llm_world) -> None:
    root, data, emb, base = llm_world
    out = root / "collab-out"
    summary = train_llm(data, emb, root / "crm", base, out, LLMTrainConfig(**TINY, collab_tokens=True))
    assert (out / "collab.safetensors").is_file() and (out / "collab.json").is_file()
    assert json.loads((out / "train.json").read_text())["prompt"]["collab_tokens"] is True
    assert summary["config"]["collab_tokens"] is True
    scorer = load_trained(out, base, "float32", k_text=3, device="cpu")
    assert scorer.collab is not None and scorer.builder.collab_id is not None
    trained = scorer.collab.user[-1].weight
    assert trained.abs().sum() > 0  # it moved from its zero start


def test_prompt_forms_judges_collab_tokens_against_the_lora_alone(llm_world) -> None:
    """The study that judges the mode: the same requests, each LoRA scored with what it was trained
    with, paired differences alone and fused on validation and test, and test AUC by slice."""
    from training.studies.prompt_forms import FormsConfig, judge_forms

    root, data, emb, base = llm_world
    common = {**TINY, "n_samples": 40, "prompt_form": "shared", "request_size": 4}
    train_llm(data, emb, root / "crm", base, root / "forms-plain", LLMTrainConfig(**common))
    train_llm(data, emb, root / "crm", base, root / "forms-collab", LLMTrainConfig(**common, collab_tokens=True))
    cfg = FormsConfig(valid_samples=60, n_test=60, request_size=5, dtype="float32", k_text=3)
    loras = {"reclora": root / "forms-plain", "collab": root / "forms-collab"}
    result = judge_forms(data, emb, root / "crm", base, loras, root / "forms-judged", cfg, echo=lambda _: None)
    plain, collab = result["rows"]
    assert collab["valid_diff_se"] > 0 and collab["valid_fused_diff_se"] > 0 and collab["test_fused_diff_se"] > 0
    assert collab["valid_diff"] == pytest.approx(collab["valid_auc"] - plain["valid_auc"])
    assert set(result["slices"]) == {"alone", "fused"}
    scored = [r for r in result["slices"]["alone"] if r["models"]]
    assert scored and all({"CRM", "reclora", "collab"} == set(r["models"]) for r in scored)
    fused = [r for r in result["slices"]["fused"] if r["models"]]
    assert fused and all(set(r["models"]) == {"reclora", "collab", "reclora by support", "collab by support"}
                         for r in fused)
    for row in result["rows"]:  # what the export's rule serves, and its test AUC
        assert 0.0 <= row["valid_by_support_auc"] <= 1.0 and 0.0 <= row["test_by_support_auc"] <= 1.0
        picked = {"crm": result["crm"]["test"], "plain": row["test_fused_auc"],
                  "by_support": row["test_by_support_auc"]}[row["serves"]]
        assert row["test_served_auc"] == pytest.approx(picked)
    markdown = (root / "forms-judged" / "prompt_forms.md").read_text()
    assert "Test AUC by slice" in markdown and "validation picks" in markdown and "reclora by support" in markdown


def test_a_stopped_collab_run_resumes_to_the_same_projector(llm_world) -> None:
    """The mid-run state keeps the projector and its optimizer moments beside the LoRA."""
    from safetensors.torch import load_file

    root, data, emb, base = llm_world
    cfg = LLMTrainConfig(**{**TINY, "n_samples": 48, "epochs": 2}, collab_tokens=True)
    whole = train_llm(data, emb, root / "crm", base, root / "collab-whole", cfg)
    partial = train_llm(data, emb, root / "crm", base, root / "collab-stopped", cfg, stop_after_steps=3)
    assert partial["finished"] is False
    rest = train_llm(data, emb, root / "crm", base, root / "collab-stopped", cfg)
    assert [h["valid_auc"] for h in rest["history"]] == [h["valid_auc"] for h in whole["history"]]
    for name in ("collab.safetensors", "weights.safetensors"):
        a, b = load_file(root / "collab-whole" / name), load_file(root / "collab-stopped" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
