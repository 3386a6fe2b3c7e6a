"""The pipeline during a canary, without HTTP: one routing read per request, answers wholly one
version's, shadow scores from the background queue into the log (never served), an aborted
candidate's answer never returned, and every outcome reported for the guard rails. Real Redis
histories and the world's bundle; the engine is scripted so that each version's LLM answer is
known."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np
import pytest
import redis
from tests.redis_support import REDIS_URL

from service.config import AdapterCacheSettings, RequestSettings
from service.history import HistorySettings, HistoryStore
from service.model import ModelHolder
from service.model.holder import user_bucket
from service.nearline.served_log import ServedLog
from service.personalization.adapter_cache import AdapterCache
from service.scoring.contracts import ScoreSource, ServedOutcome
from service.scoring.pipeline import ScoringPipeline

pytestmark = pytest.mark.anyio
CANDIDATES = [3, 11, 17, 29, 42]


class VersionEngine:
    """P(Yes) = a constant per adapter version (read from the adapter key), so a response shows
    which version's LLM scored it; ``on_score`` runs inside the forward."""

    LEVEL = {"e2e-v1": 0.3, "cand-v2": 0.7}

    def __init__(self) -> None:
        self.on_score = None
        self.calls: list[str] = []

    def expected_ms(self, prefix, suffixes):
        return None

    def score(self, adapter, prefix, suffixes, deadline=None, interrupted=None, embeds=None) -> np.ndarray:
        version = adapter.key.split("@")[1].split("#")[0]
        self.calls.append(version)
        if self.on_score is not None:
            self.on_score()
        return np.full(len(suffixes), self.LEVEL[version], np.float32)

    def close(self) -> None:
        pass


@pytest.fixture
async def parts(world, loaded, redis_prefix):
    history = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=world.prefix))
    model, builder = loaded
    candidate = dataclasses.replace(model, version="cand-v2")
    served: list[tuple[str, ServedOutcome]] = []
    log = ServedLog(history.client, prefix=redis_prefix)
    engine = VersionEngine()
    holder = ModelHolder(model, builder)
    adapters = AdapterCache(AdapterCacheSettings(adapter_cache_bytes=64 << 20))
    pipeline = ScoringPipeline(history=history, holder=holder, engine=engine, adapters=adapters,
                               settings=RequestSettings(default_deadline_ms=20_000, max_deadline_ms=20_000,
                                                        history_budget_ms=2_000, llm_min_ms=1.0),
                               on_served=lambda v, outcome, ms: served.append((v, outcome)), served_log=log)
    yield pipeline, holder, candidate, engine, served, log
    pipeline.close()
    await history.aclose()


def split_users(world, candidate: str, percent: float) -> tuple[list[str], list[str]]:
    inside = [u for u in world.users if user_bucket(u, candidate) < percent * 100]
    outside = [u for u in world.users if user_bucket(u, candidate) >= percent * 100]
    assert inside and outside
    return inside, outside


async def test_users_are_routed_and_each_answer_is_one_versions(world, parts):
    pipeline, holder, candidate, engine, served, _ = parts
    model = holder.snapshot().model
    holder.start_canary(candidate, holder.snapshot().builder, 50, shadow=False)
    inside, outside = split_users(world, "cand-v2", 50)
    for user in inside[:3] + outside[:3]:
        result = await pipeline.score(user, CANDIDATES)
        version = "cand-v2" if user in inside else "e2e-v1"
        assert result.model_version == version and not result.degraded
        llm = VersionEngine.LEVEL[version]
        assert all(c.llm_score == pytest.approx(llm) for c in result.candidates)
        np.testing.assert_allclose([c.score for c in result.candidates],
                                   model.fusion(np.full(5, llm), np.array([c.crm_score for c in result.candidates])),
                                   atol=1e-6)
    assert [v for v, _ in served] == ["cand-v2"] * 3 + ["e2e-v1"] * 3
    assert {o for _, o in served} == {ServedOutcome.OK}


async def test_an_abort_during_a_request_never_returns_the_candidates_answer(world, parts):
    pipeline, holder, candidate, engine, served, _ = parts
    holder.start_canary(candidate, holder.snapshot().builder, 50, shadow=False)
    user = split_users(world, "cand-v2", 50)[0][0]

    def abort() -> None:
        engine.on_score = None
        holder.end_canary(withdraw=True)  # as a guard rail trips while the candidate scores

    engine.on_score = abort
    result = await pipeline.score(user, CANDIDATES)
    assert engine.calls == ["cand-v2", "e2e-v1"]  # scored anew on the stable version
    assert result.model_version == "e2e-v1"
    assert all(c.llm_score == pytest.approx(VersionEngine.LEVEL["e2e-v1"]) for c in result.candidates)
    assert served == [("e2e-v1", ServedOutcome.OK)]


async def test_a_shadow_is_scored_in_the_background_recorded_and_not_served(world, parts, redis_prefix):
    pipeline, holder, candidate, engine, served, log = parts
    holder.start_canary(candidate, holder.snapshot().builder, 100, shadow=True)
    user = world.users[0]
    result = await pipeline.score(user, CANDIDATES, request_id="req-1")
    assert result.model_version == "e2e-v1"
    deadline = time.monotonic() + 10
    while "cand-v2" not in engine.calls:  # the background job runs once the engine is free
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    deadline = time.monotonic() + 10
    r = redis.Redis.from_url(REDIS_URL)
    try:
        key = log.user_key(user)
        while not r.hexists(key, f"{CANDIDATES[0]}|shadow"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await log.flush()
        shadow = [json.loads(r.hget(key, f"{c}|shadow")) for c in CANDIDATES]
        own = [json.loads(r.hget(key, str(c))) for c in CANDIDATES]
        stream = [f for _, f in r.xrange(log.stream_keys[0])]
    finally:
        r.close()
    assert {s[0] for s in shadow} == {"cand-v2"} and {s[3] for s in shadow} == {"req-1"}
    assert [s[4] for s in shadow] == pytest.approx([VersionEngine.LEVEL["cand-v2"]] * 5)  # its LLM score
    assert [o[1] for o in own] == pytest.approx([c.score for c in result.candidates])
    assert sorted((f[b"v"], f[b"sh"]) for f in stream) == [(b"cand-v2", b"1")] * 5 + [(b"e2e-v1", b"0")] * 5
    assert served == [("e2e-v1", ServedOutcome.OK)]  # the shadow is no answer


async def test_a_candidate_whose_fusion_says_crm_never_runs_its_llm(world, parts):
    pipeline, holder, candidate, engine, served, log = parts
    crm_only = dataclasses.replace(candidate, fusion=dataclasses.replace(candidate.fusion, serve="crm"))
    holder.start_canary(crm_only, holder.snapshot().builder, 100, shadow=True)  # shadow: the stable answers
    user = world.users[0]
    result = await pipeline.score(user, CANDIDATES, request_id="req-crm")
    assert result.model_version == "e2e-v1" and result.score_source is ScoreSource.FUSED
    r = redis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 10
        while not r.hexists(log.user_key(user), f"{CANDIDATES[0]}|shadow"):  # scored without the engine
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        shadow = [json.loads(r.hget(log.user_key(user), f"{c}|shadow")) for c in CANDIDATES]
    finally:
        r.close()
    assert {s[0] for s in shadow} == {"cand-v2"} and [s[4] for s in shadow] == [None] * 5  # no LLM score
    assert [s[1] for s in shadow] == pytest.approx([s[5] for s in shadow])  # the CRM's score, served as is

    holder.end_canary(withdraw=True)
    holder.start_canary(crm_only, holder.snapshot().builder, 100, shadow=False)  # the candidate answers
    result = await pipeline.score(user, CANDIDATES)
    assert result.model_version == "cand-v2" and result.score_source is ScoreSource.CRM and not result.degraded
    assert all(c.llm_score is None and c.score == c.crm_score for c in result.candidates)
    assert engine.calls == ["e2e-v1"]  # only the stable version's own answer ran a forward


async def test_a_failing_request_is_reported_as_an_error_of_its_version(world, parts, monkeypatch):
    pipeline, holder, candidate, engine, served, _ = parts
    holder.start_canary(candidate, holder.snapshot().builder, 50, shadow=False)
    user = split_users(world, "cand-v2", 50)[0][0]

    def broken(*args):
        raise RuntimeError("CRM weights corrupt")

    monkeypatch.setattr("service.scoring.pipeline.run_crm", broken)
    with pytest.raises(RuntimeError):
        await pipeline.score(user, CANDIDATES)
    assert served == [("cand-v2", ServedOutcome.ERROR)]
