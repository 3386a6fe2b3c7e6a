"""``reclora knowledge`` on synthetic data and a tiny Llama: no leakage, resumable, shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.engine.base import ForwardInterrupted
from service.knowledge.encode import BASE_LLM_MEAN, MINILM
from service.knowledge.generate import generate_greedy
from service.knowledge.prompts import KnowledgePrompts, knowledge_prompts_for
from tests.tiny_llama import build_tiny_llama
from training.data.samples import PreparedData, prepare
from training.data.synthetic import generate_synthetic
from training.knowledge import build as build_module
from training.knowledge.build import (KnowledgeConfig, KnowledgeRunMismatch, PartStore, build_knowledge,
                                      cutoff_timestamp, user_prompts)
from training.llm.prompts import catalog_texts, user_profiles


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("knowledge")
    data = prepare(generate_synthetic(n_users=40, n_items=30, n_interactions=1200, seed=5))
    data.save(root / "data")
    base = build_tiny_llama(root / "base", hidden_size=32, layers=2)
    return root, PreparedData.load(root / "data"), base


def test_user_prompts_hold_only_events_before_the_validation_period(world) -> None:
    _, data, _ = world
    prompts = knowledge_prompts_for(data.meta, max_behaviours=1000)
    cutoff = cutoff_timestamp(data)
    assert cutoff == data.split("valid")["timestamp"].min()
    frame = user_prompts(data, prompts, cutoff)
    texts, profiles = catalog_texts(data.items), user_profiles(data.users)
    late_users = set(data.events.loc[data.events["timestamp"] >= cutoff, "user_idx"])
    assert late_users & set(frame["user_idx"]), "the data must have users with events on both sides"
    for row in frame.itertuples():
        events = data.events[data.events["user_idx"] == row.user_idx].sort_values("order")
        before = events[events["timestamp"] < cutoff]
        assert row.events_used == len(before) and row.last_timestamp < cutoff
        expected = [(texts[int(i)].render(), float(r)) for i, r in zip(before["item_idx"], before["rating"])]
        assert row.prompt == prompts.user_prompt(profiles[row.user_idx], expected, data.meta["rating_max"])
    # Rewriting every event at or after the cutoff changes no prompt.
    changed = data.events.copy()
    late = changed["timestamp"] >= cutoff
    changed.loc[late, "item_idx"] = changed.loc[late, "item_idx"] % len(data.items) + 1
    changed.loc[late, "rating"] = 1.0
    other = PreparedData(data.items, data.users, changed, data.samples, data.meta)
    assert user_prompts(other, prompts, cutoff)["prompt"].tolist() == frame["prompt"].tolist()
    # A user whose events all lie at or after the cutoff has no prompt.
    first = data.events.groupby("user_idx")["timestamp"].min()
    assert set(first[first >= cutoff].index).isdisjoint(frame["user_idx"])


def test_prompts_use_the_dataset_words() -> None:
    book = knowledge_prompts_for({"item_noun": "book", "item_plural": "books", "item_verb": "read"})
    text = book.item_prompt("Dune (1965)") + book.user_prompt({"age": "25"}, [("Dune (1965)", 5.0)])
    assert "book" in text and "author" in text and "movie" not in text and "director" not in text
    assert book.version != KnowledgePrompts().version
    assert KnowledgePrompts.model_validate(json.loads(book.model_dump_json())) == book
    with pytest.raises(ValueError):
        KnowledgePrompts(item_noun="book", version=KnowledgePrompts().version)


def test_generation_yields_to_a_request(world) -> None:
    _, _, base = world
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    with pytest.raises(ForwardInterrupted):
        generate_greedy(model, tokenizer, ["tell me about the movie"], system="you know movies",
                        max_new_tokens=8, interrupted=lambda: True)
    again = generate_greedy(model, tokenizer, ["tell me about the movie", "a user"], system="you know movies",
                            max_new_tokens=8)
    assert again == generate_greedy(model, tokenizer, ["tell me about the movie", "a user"],
                                    system="you know movies", max_new_tokens=8, batch_size=1)


def test_a_killed_run_resumes_where_it_stopped(world, tmp_path, monkeypatch) -> None:
    root, data, base = world
    prompts = knowledge_prompts_for(data.meta)
    cfg = KnowledgeConfig(max_new_tokens=6, batch_size=2, encoder=BASE_LLM_MEAN, limit_items=7, limit_users=5,
                          dtype="float32", progress=False)
    fresh = build_knowledge(root / "data", base, tmp_path / "fresh", prompts, cfg)

    calls = {"add": 0, "generated": 0}
    original_add, original_batch = PartStore.add, build_module.generate_greedy

    def dying_add(self, *args, **kwargs):
        calls["add"] += 1
        if calls["add"] == 3:
            raise KeyboardInterrupt  # killed after two batches were kept
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(PartStore, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        build_knowledge(root / "data", base, tmp_path / "run", prompts, cfg)
    monkeypatch.setattr(PartStore, "add", original_add)

    def counting(model, tokenizer, texts, **kwargs):
        calls["generated"] += len(texts)
        return original_batch(model, tokenizer, texts, **kwargs)

    monkeypatch.setattr(build_module, "generate_greedy", counting)
    resumed = build_knowledge(root / "data", base, tmp_path / "run", prompts, cfg)
    assert calls["generated"] == 7 + 5 - 4  # the four texts of the two kept batches are not generated again
    assert resumed["counts"] == fresh["counts"] == {"items": 7, "users": 5}
    for name in ("items.parquet", "users.parquet"):
        import pandas as pd

        a, b = pd.read_parquet(tmp_path / "fresh" / name), pd.read_parquet(tmp_path / "run" / name)
        assert a["text"].tolist() == b["text"].tolist()
    np.testing.assert_allclose(np.load(tmp_path / "fresh" / "item_vectors.npy"),
                               np.load(tmp_path / "run" / "item_vectors.npy"), atol=1e-6)

    with pytest.raises(KnowledgeRunMismatch, match="max_new_tokens"):
        build_knowledge(root / "data", base, tmp_path / "run", prompts,
                        KnowledgeConfig(max_new_tokens=7, batch_size=2, limit_items=7, limit_users=5, progress=False))


def test_outputs_line_up_with_dense_ids(world, tmp_path) -> None:
    root, data, base = world
    cfg = KnowledgeConfig(max_new_tokens=4, batch_size=8, encoder=MINILM, dtype="float32", progress=False)
    meta = build_knowledge(root / "data", base, tmp_path / "k", knowledge_prompts_for(data.meta), cfg)
    items = np.load(tmp_path / "k" / "item_vectors.npy")
    users = np.load(tmp_path / "k" / "user_vectors.npy")
    has = np.load(tmp_path / "k" / "user_has.npy")
    assert items.shape == (len(data.items) + 1, 384) and users.shape == (len(data.users) + 1, 384)
    assert meta["dim"] == 384 and meta["encoder"] == MINILM and meta["cutoff_timestamp"] == cutoff_timestamp(data)
    assert not items[0].any() and not users[0].any() and not has[0]
    assert np.allclose(np.linalg.norm(items[1:], axis=1), 1.0, atol=1e-4)
    assert np.array_equal(np.linalg.norm(users, axis=1) > 0.5, has)
    first = data.events.groupby("user_idx")["timestamp"].min()
    assert set(np.flatnonzero(has)) == set(first[first < meta["cutoff_timestamp"]].index)
