"""Few2Many training, prompts and retrieval on a tiny random Llama and synthetic data."""

import json
from dataclasses import asdict

import numpy as np
import pytest
from transformers import AutoTokenizer

from service.llm.prompt import AnswerTokenError, PromptBuilder, PromptConfig
from service.llm.prompt import Behaviour
from service.retrieval.history import semantic_positions, shared_positions
from training.llm.loading import load_trained
from training.llm.prompts import catalog_texts, request_prompts, sample_prompts, user_profiles
from training.llm.requests import request_slices, user_requests
from training.llm.train import LLMTrainConfig, train_llm
from training.studies.prompt_forms import FormsConfig, judge_forms


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


def test_requests_are_prompted_as_the_gateway_prompts_them(llm_world) -> None:
    """Shared form: one history retrieved for the request's candidates closes the prefix; per-target:
    each candidate's own history in its suffix, the profile prefix once."""
    _, data, emb, base = llm_world
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = user_requests(data.split("valid").head(40), 4)
    texts, profiles = catalog_texts(data.items), user_profiles(data.users)
    items, ratings = data.events["item_idx"].to_numpy(), data.events["rating"].to_numpy()
    for form in ("shared", "per_target"):
        builder = PromptBuilder(tokenizer, PromptConfig(form=form))
        prompts = request_prompts(data, rows, builder, emb, 3, "semantic")
        assert len(prompts) == rows["request"].nunique()
        for part, prompt in zip(request_slices(rows), prompts):
            request = rows.iloc[part]
            end, n = int(request["hist_end"].iloc[0]), int(request["hist_len"].iloc[0])
            hist_items, hist_ratings = items[end - n : end], ratings[end - n : end]
            candidates = request["item_idx"].to_numpy()
            targets = [texts[int(c)] for c in candidates]
            profile = profiles[int(request["user_idx"].iloc[0])]

            def behaviours(positions) -> list[Behaviour]:
                return [Behaviour(texts[int(hist_items[p])], float(hist_ratings[p])) for p in positions]

            if form == "shared":
                expected = builder.encode_shared(profile, behaviours(shared_positions(hist_items, candidates, emb, 3)),
                                                 targets)
            else:
                expected = builder.encode(profile, [behaviours(p) for p in semantic_positions(
                    hist_items, candidates, emb, 3)], targets)
            assert (prompt.prefix, prompt.suffixes) == (list(expected[0]), [list(s) for s in expected[1]])


def test_shared_form_trains_on_requests_and_is_judged_against_per_target(llm_world) -> None:
    """``--request-size``: requests of a user's next samples, the prefix once each; the prompt-forms
    study scores both forms on the same requests with paired differences."""
    root, data, emb, base = llm_world
    common = dict(n_samples=48, k_text=3, epochs=1, batch_size=8, grad_accum=1, lr=5e-3, valid_samples=24,
                  evals_per_epoch=1, dtype="float32", device="cpu", progress=False,
                  lora=dict(n_meta=2, user_dim=64, r=4, lora_alpha=8))
    grouped = train_llm(data, emb, root / "crm", base, root / "requests",
                        LLMTrainConfig(**common, prompt_form="shared", request_size=6))
    train_llm(data, emb, root / "crm", base, root / "targets", LLMTrainConfig(**common))
    assert grouped["instances"] == 96  # 48 samples in requests, two views each
    recorded = json.loads((root / "requests" / "train.json").read_text())
    assert recorded["config"]["request_size"] == 6 and recorded["prompt"]["form"] == "shared"
    cfg = FormsConfig(valid_samples=60, n_test=60, request_size=5, dtype="float32", k_text=3)
    loras = {"per-target": root / "targets", "shared": root / "requests"}
    result = judge_forms(data, emb, root / "crm", base, loras, root / "forms", cfg, echo=lambda _: None)
    assert [r["form"] for r in result["rows"]] == ["per_target", "shared"]
    assert result["rows_per_split"] == {"valid": 60, "test": 60}
    assert result["requests"]["valid"] < 60  # candidates of one user share requests
    first, second = result["rows"]
    assert "valid_diff" not in first and second["valid_diff"] == pytest.approx(second["valid_auc"] - first["valid_auc"])
    assert second["valid_diff_se"] > 0 and second["test_fused_diff_se"] > 0
    assert second["tokens_per_request"] < first["tokens_per_request"]  # the history once, not per candidate
    assert second["request_size"] == 6 and first["request_size"] == 1
    table = (root / "forms" / "prompt_forms.md").read_text()
    assert "| shared | shared | 6 |" in table
    kept = sorted(p.name for p in (root / "forms" / "scores").iterdir())
    assert len(kept) == 6  # per LoRA: its record and each split's scores
    again = judge_forms(data, emb, root / "crm", base, loras, root / "forms", cfg, echo=lambda _: None)
    assert again["rows"] == result["rows"]  # read back, not scored again
