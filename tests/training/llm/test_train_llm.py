"""Few2Many training, prompts and retrieval on a tiny random Llama and synthetic data."""

import json
from dataclasses import asdict

import numpy as np
import pytest
from transformers import AutoTokenizer

from service.llm.prompt import AnswerTokenError, PromptBuilder, PromptConfig
from service.retrieval.history import semantic_positions
from training.llm.loading import load_trained
from training.llm.prompts import sample_prompts
from training.llm.train import LLMTrainConfig, train_llm


def test_answer_tokens_are_single_and_distinct(llm_world) -> None:
    *_, base = llm_world
    builder = PromptBuilder(AutoTokenizer.from_pretrained(base))
    assert builder.yes_id != builder.no_id
    tok = builder.tokenizer
    assert tok.convert_ids_to_tokens([builder.yes_id, builder.no_id]) == ["Yes", "No"]
    with pytest.raises(AnswerTokenError):
        PromptBuilder(tok, PromptConfig(yes="Yes", no="Yes"))
    with pytest.raises(AnswerTokenError):
        PromptBuilder(tok, PromptConfig(yes="Absolutelyzzq"))  # not one token of this vocabulary


def test_retrieved_history_is_chronological_and_most_similar(llm_world) -> None:
    _, data, emb, _ = llm_world
    hist = np.array([5, 9, 13, 2, 40, 33, 7, 21])
    cands = np.array([11, 30])
    for cand, pos in zip(cands, semantic_positions(hist, cands, emb, 3)):
        assert list(pos) == sorted(pos)
        sims = emb[hist] @ emb[cand]
        assert set(pos) == set(np.argsort(-sims)[:3])


def test_prompts_share_the_profile_prefix(llm_world) -> None:
    _, data, emb, base = llm_world
    builder = PromptBuilder(AutoTokenizer.from_pretrained(base))
    samples = data.split("train")
    user = samples["user_idx"].iloc[0]
    rows = samples[samples["user_idx"] == user].head(2)
    a, b = sample_prompts(data, rows, builder, emb, 5, "semantic")
    prefix = builder.encode_text(builder.prefix_text({}))
    assert len(a) > 10 and a[:5] == b[:5]
    assert len(prefix) > 0


def test_training_lowers_the_loss_and_saves_a_loadable_adapter(llm_world) -> None:
    root, data, emb, base = llm_world
    cfg = LLMTrainConfig(n_samples=64, k_text=3, epochs=3, batch_size=8, grad_accum=1, lr=5e-3,
                         valid_samples=32, evals_per_epoch=1, dtype="float32", device="cpu", progress=False,
                         lora=dict(n_meta=4, user_dim=64, r=4, lora_alpha=8))
    summary = train_llm(data, emb, root / "crm", base, root / "out", cfg)
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses[-1] < losses[0], losses
    assert (root / "out" / "weights.safetensors").is_file()
    assert json.loads((root / "out" / "train.json").read_text())["instances"] == 128  # ReiT: two views each
    scorer = load_trained(root / "out", base, "float32", k_text=3, device="cpu")
    assert scorer.lora is not None and len(scorer.lora.module_names) == 4  # q and v of two layers


def test_shared_form_samples_hold_their_target_history_in_the_prefix(llm_world) -> None:
    """One target is the sample's candidate set: the same history as the per-target form's, with
    the history closing the prefix and the question alone after it."""
    _, data, emb, base = llm_world
    tokenizer = AutoTokenizer.from_pretrained(base)
    per_target, shared = PromptBuilder(tokenizer), PromptBuilder(tokenizer, PromptConfig(form="shared"))
    rows = data.split("train").head(6)
    above = len(tokenizer(" above", add_special_tokens=False)["input_ids"])  # the one word the forms differ by
    for view in ("semantic", "recent"):
        for a, b in zip(sample_prompts(data, rows, per_target, emb, 3, view),
                        sample_prompts(data, rows, shared, emb, 3, view)):
            at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            assert b[:at] + b[at + above:] == a
            assert "watched" in tokenizer.decode(b[at - 1 : at])


def test_a_run_recorded_before_the_prompt_form_was_per_target() -> None:
    recorded = json.loads(json.dumps(asdict(LLMTrainConfig())))
    del recorded["prompt_form"]
    assert LLMTrainConfig().changed_from(recorded) == []
    assert LLMTrainConfig(prompt_form="shared").changed_from(recorded) == ["prompt_form"]
    with pytest.raises(ValueError, match="prompt_form"):
        LLMTrainConfig(prompt_form="per-candidate").check()
