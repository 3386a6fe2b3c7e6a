"""ScoringPipeline without HTTP: stage order, every degrade decision, the deadline arithmetic and
the one version snapshot a request reads. Real Redis histories and the real bundle of the shared
world; engines stand in only where a test needs the engine to fail, lag or predict a pace."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config import AdapterCacheSettings, RequestSettings
from service.history import HistorySettings, HistoryStore, UserHistory
from service.model import ModelHolder
from service.personalization.adapter_cache import AdapterCache
from service.scoring.contracts import DegradedReason, Stage, UnknownItems
from service.scoring.pipeline import ScoringPipeline, llm_admission
from service.scoring.stages import UserHistoryView, run_crm
from tests.redis_support import REDIS_URL
from tests.telemetry_support import RecordedTelemetry

pytestmark = pytest.mark.anyio
CANDIDATES = [3, 11, 17, 29, 42]
FULL_STAGES = ["history", "crm", "retrieval", "prompts", "adapter", "llm", "total"]


class ScriptedEngine:
    """Scores by a fixed rule, after ``delay_s``; predicts ``expected`` ms; fails when told to.
    Records every call with the deadline it was given."""

    def __init__(self, *, expected: float | None = None, delay_s: float = 0.0, error: Exception | None = None,
                 on_score=None) -> None:
        self.expected, self.delay_s, self.error, self.on_score = expected, delay_s, error, on_score
        self.calls: list[dict] = []

    def expected_ms(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> float | None:
        return self.expected

    def score(self, adapter, prefix, suffixes, deadline=None, interrupted=None, embeds=None) -> np.ndarray:
        self.calls.append({"adapter": adapter, "n": len(suffixes), "deadline": deadline})
        if self.on_score is not None:
            self.on_score()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return np.linspace(0.2, 0.8, len(suffixes)).astype(np.float32)

    def close(self) -> None:
        pass


class DeadHistory:
    """A history store whose Redis is down."""

    async def read(self, user_id: str) -> UserHistory:
        raise RedisConnectionError("connection refused")


class SlowHistory:
    """A history store that answers after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def read(self, user_id: str) -> UserHistory:
        await asyncio.sleep(self.delay_s)
        raise AssertionError("the history budget should have run out first")


class CountingHolder(ModelHolder):
    """Counts snapshots: a request must take exactly one."""

    snapshots = 0

    def snapshot(self):
        self.snapshots += 1
        return super().snapshot()


@pytest.fixture
async def history(world):
    store = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=world.prefix))
    yield store
    await store.aclose()


def make_pipeline(loaded, history, engine, **overrides) -> tuple[ScoringPipeline, list[str], list[DegradedReason]]:
    """A pipeline on the world's bundle; returns it with the stages and degraded reasons it reported."""
    telemetry = RecordedTelemetry()
    model, builder = loaded
    options = dict(default_deadline_ms=20_000, history_budget_ms=2_000, llm_min_ms=20.0)
    options.update(overrides)
    holder = options.pop("holder", None) or ModelHolder(model, builder)
    adapters = AdapterCache(AdapterCacheSettings(adapter_cache_bytes=64 << 20))
    pipeline = ScoringPipeline(history=history, holder=holder, engine=engine, adapters=adapters,
                               settings=RequestSettings(max_deadline_ms=600_000, **options), telemetry=telemetry)
    return pipeline, telemetry.of(Stage), telemetry.of(DegradedReason)


def expected_crm(world, loaded, user: str) -> np.ndarray:
    model, _ = loaded
    items, ratings, _, profile = world.histories[user]
    view = UserHistoryView.from_raw(model, np.asarray(items, np.int64), np.asarray(ratings, np.float32), profile)
    return run_crm(model, view, model.catalog.to_dense(CANDIDATES)).scores


async def test_stages_run_in_order_and_the_llm_scores_are_fused(world, loaded, history):
    engine = ScriptedEngine()
    pipeline, stages, degraded = make_pipeline(loaded, history, engine)
    try:
        result = await pipeline.score(world.users[0], CANDIDATES)
    finally:
        pipeline.close()
    assert stages == FULL_STAGES and list(result.timings_ms) == FULL_STAGES
    assert not result.degraded and result.degraded_reasons == [] and degraded == []
    assert not result.cold_start and result.model_version == world.version
    llm = np.linspace(0.2, 0.8, len(CANDIDATES))
    crm = expected_crm(world, loaded, world.users[0])
    model, _ = loaded
    assert [c.item_id for c in result.candidates] == CANDIDATES
    np.testing.assert_allclose([c.llm_score for c in result.candidates], llm, atol=1e-6)
    np.testing.assert_allclose([c.crm_score for c in result.candidates], crm, atol=1e-6)
    np.testing.assert_allclose([c.score for c in result.candidates], model.fusion(llm, crm), atol=1e-6)
    assert len(engine.calls) == 1 and engine.calls[0]["n"] == len(CANDIDATES)
    assert engine.calls[0]["adapter"].user_id == world.users[0]


def assert_crm_answer(result, world, loaded, user: str | None, reason: DegradedReason) -> None:
    assert result.degraded and result.degraded_reasons == [reason]
    assert all(c.llm_score is None for c in result.candidates)
    assert [c.score for c in result.candidates] == [c.crm_score for c in result.candidates]
    if user is not None:
        np.testing.assert_allclose([c.crm_score for c in result.candidates], expected_crm(world, loaded, user),
                                   atol=1e-6)


@pytest.mark.parametrize("history_kind", ["down", "slow"])
async def test_history_unavailable_scores_as_cold_start(world, loaded, history_kind):
    source = DeadHistory() if history_kind == "down" else SlowHistory(5.0)
    engine = ScriptedEngine()
    pipeline, stages, degraded = make_pipeline(loaded, source, engine, history_budget_ms=50)
    try:
        start = time.perf_counter()
        result = await pipeline.score(world.users[0], CANDIDATES)
        elapsed = time.perf_counter() - start
    finally:
        pipeline.close()
    assert result.cold_start and result.degraded
    assert result.degraded_reasons == [DegradedReason.HISTORY_UNAVAILABLE] == degraded
    assert stages[0] == "history" and elapsed < 3.0  # the budget, not the slow store, bounds the wait
    assert len(engine.calls) == 1  # the LLM still scores the cold-start prompts


async def test_too_little_time_left_skips_the_llm(world, loaded, history):
    engine = ScriptedEngine()
    pipeline, stages, degraded = make_pipeline(loaded, history, engine, llm_min_ms=1e9)
    try:
        result = await pipeline.score(world.users[0], CANDIDATES)
    finally:
        pipeline.close()
    assert_crm_answer(result, world, loaded, world.users[0], DegradedReason.DEADLINE)
    assert engine.calls == [] and degraded == [DegradedReason.DEADLINE]
    assert "llm" not in stages and stages[-1] == "total"


async def test_a_pace_that_predicts_an_overrun_skips_the_llm(world, loaded, history):
    engine = ScriptedEngine(expected=1e9)
    pipeline, _, degraded = make_pipeline(loaded, history, engine)
    try:
        result = await pipeline.score(world.users[0], CANDIDATES, deadline_ms=5_000)
    finally:
        pipeline.close()
    assert_crm_answer(result, world, loaded, world.users[0], DegradedReason.LLM_OVERRUN_EXPECTED)
    assert engine.calls == [] and degraded == [DegradedReason.LLM_OVERRUN_EXPECTED]


async def test_a_forward_past_the_deadline_answers_with_crm_scores(world, loaded, history):
    engine = ScriptedEngine(delay_s=1.5)
    pipeline, _, degraded = make_pipeline(loaded, history, engine, llm_min_ms=1.0)
    try:
        start = time.perf_counter()
        result = await pipeline.score(world.users[0], CANDIDATES, deadline_ms=700)
        elapsed = time.perf_counter() - start
    finally:
        pipeline.close()
    assert_crm_answer(result, world, loaded, world.users[0], DegradedReason.LLM_TIMEOUT)
    assert elapsed < 1.4  # answered at the deadline, not when the forward ended
    assert degraded == [DegradedReason.LLM_TIMEOUT]


async def test_an_engine_failure_answers_with_crm_scores(world, loaded, history):
    engine = ScriptedEngine(error=RuntimeError("engine exploded"))
    pipeline, _, degraded = make_pipeline(loaded, history, engine)
    try:
        result = await pipeline.score(world.users[0], CANDIDATES)
    finally:
        pipeline.close()
    assert_crm_answer(result, world, loaded, world.users[0], DegradedReason.LLM_ERROR)
    assert degraded == [DegradedReason.LLM_ERROR]


async def test_the_engine_gets_the_request_deadline(world, loaded, history):
    engine = ScriptedEngine()
    pipeline, _, _ = make_pipeline(loaded, history, engine, default_deadline_ms=7_000)
    try:
        before = time.perf_counter()
        await pipeline.score(world.users[0], CANDIDATES, deadline_ms=3_000)
        await pipeline.score(world.users[0], CANDIDATES)  # no deadline: the default
        after = time.perf_counter()
    finally:
        pipeline.close()
    first, second = (call["deadline"] for call in engine.calls)
    assert before + 3.0 <= first <= after + 3.0
    assert before + 7.0 <= second <= after + 7.0 and second > first


@pytest.mark.parametrize(("remaining", "expected", "minimum", "reason"), [
    (100.0, None, 20.0, None),  # no pace known: try
    (19.9, None, 20.0, DegradedReason.DEADLINE),
    (19.9, 1.0, 20.0, DegradedReason.DEADLINE),  # the floor comes first
    (100.0, 100.1, 20.0, DegradedReason.LLM_OVERRUN_EXPECTED),
    (100.0, 100.0, 20.0, None),  # exactly fits
    (20.0, 5.0, 20.0, None),
])
def test_llm_admission_arithmetic(remaining, expected, minimum, reason):
    assert llm_admission(remaining, expected, minimum) == reason


async def test_a_request_reads_one_snapshot_even_across_a_swap(world, loaded, history):
    model, builder = loaded
    newer = dataclasses.replace(model, version="swapped-v2")
    holder = CountingHolder(model, builder)
    engine = ScriptedEngine(on_score=lambda: holder.swap(newer, builder))  # an activation mid-request
    pipeline, _, _ = make_pipeline(loaded, history, engine, holder=holder)
    try:
        result = await pipeline.score(world.users[0], CANDIDATES)
        assert holder.snapshots == 1 and result.model_version == world.version
        engine.on_score = None
        assert (await pipeline.score(world.users[0], CANDIDATES)).model_version == "swapped-v2"
        assert holder.snapshots == 2
    finally:
        pipeline.close()


async def test_unknown_candidates_are_refused_before_anything_is_scored(world, loaded, history):
    engine = ScriptedEngine()
    pipeline, stages, _ = make_pipeline(loaded, history, engine)
    try:
        with pytest.raises(UnknownItems) as refused:
            await pipeline.score(world.users[0], [3, 999_999, 17, 888_888])
    finally:
        pipeline.close()
    assert refused.value.items == [999_999, 888_888] and refused.value.model_version == world.version
    assert stages == [] and engine.calls == []
    assert pipeline.unknown_items([3, 999_999]) == [999_999]
