"""Which knowledge vector a request serves, and the refresh's user prompt: the same text the
offline ``reclora knowledge`` writes for the same events (so refreshed vectors replace offline
ones like for like)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from service.crm.knowledge import KnowledgeConfig
from service.history import KnowledgeRecord, UserHistory
from service.knowledge.prompts import knowledge_prompts_for
from service.scoring.user_knowledge import BaseLLMKnowledge, KnowledgeOutcome, serve_knowledge
from training.knowledge.build import cutoff_timestamp, user_prompts


@pytest.fixture(scope="module")
def knowing(loaded, world):
    """The world's version as if it read 4-d knowledge vectors of encoder enc-a."""
    model, _ = loaded
    prompts = knowledge_prompts_for(world.data.meta, max_behaviours=12)
    return dataclasses.replace(model, knowledge=KnowledgeConfig(encoder="enc-a", dim=4, prompts=prompts.model_dump(),
                                                                max_new_tokens=8))


def record(encoder: str = "enc-a", dim: int = 4, at: float | None = None) -> KnowledgeRecord:
    return KnowledgeRecord(np.arange(1, dim + 1, dtype=np.float32), encoder, 3, time.time() - 90 if at is None else at)


def test_the_stored_vector_serves_when_the_versions_encoder_made_it(knowing) -> None:
    served = serve_knowledge(knowing, record(), None, now=time.time())
    assert served.outcome is KnowledgeOutcome.VECTOR
    np.testing.assert_array_equal(served.vector, [1, 2, 3, 4])
    assert 89 <= served.age_s <= 120
    future = serve_knowledge(knowing, record(at=time.time() + 60), None)  # a writer's clock ahead of ours
    assert future.age_s == 0.0


@pytest.mark.parametrize("stored,error,outcome", [
    (None, None, KnowledgeOutcome.DEFAULT_MISSING),
    (None, "knowledge vector of 6 bytes, expected 2 float32", KnowledgeOutcome.DEFAULT_MALFORMED),
    (record(encoder="enc-b"), None, KnowledgeOutcome.DEFAULT_MISMATCH),
    (record(dim=8), None, KnowledgeOutcome.DEFAULT_MISMATCH),
])
def test_otherwise_the_crm_default_serves_and_says_why(knowing, stored, error, outcome) -> None:
    served = serve_knowledge(knowing, stored, error)
    assert served.vector is None and served.outcome is outcome and served.age_s is None


def test_a_version_without_knowledge_reads_no_vector_and_counts_nothing(loaded) -> None:
    model, _ = loaded
    assert model.knowledge is None
    assert serve_knowledge(model, record(), None) == serve_knowledge(model, None, None)
    assert serve_knowledge(model, record(), None).outcome is None


def test_the_refresh_prompt_is_the_offline_prompt_for_the_same_events(knowing, world) -> None:
    data = world.data
    cutoff = cutoff_timestamp(data)
    prompts = knowledge_prompts_for(data.meta, max_behaviours=12)
    offline = user_prompts(data, prompts, cutoff).set_index("user")
    source = BaseLLMKnowledge(None, None, None)
    checked = 0
    for user in world.users[:6]:
        items, ratings, stamps, profile = world.histories[user]
        before = stamps < cutoff
        if not before.any():
            continue
        history = UserHistory(items[before], ratings[before], stamps[before], profile, exists=True)
        system, prompt = source.prompt(knowing, history)
        assert prompt == offline.loc[int(user), "prompt"]
        assert system == prompts.system_message()
        checked += 1
    assert checked >= 3


def test_the_refresh_decodes_as_the_offline_texts_were_decoded() -> None:
    made = KnowledgeConfig(encoder="enc-a", dim=4, max_new_tokens=96,
                           generator={"decoding": "greedy", "repetition_penalty": 1.15})
    assert made.decoding(128) == {"max_new_tokens": 96, "repetition_penalty": 1.15}
    silent = KnowledgeConfig(encoder="enc-a", dim=4)  # a config from before either was recorded
    assert silent.decoding(128) == {"max_new_tokens": 128, "repetition_penalty": 1.0}
