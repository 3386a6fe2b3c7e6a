"""The nearline knowledge refresh over the real Redis and the real engine scheduler: when a refresh
is due, one job per user, what it writes, and how yielding, failing, a gateway without a base LLM
and a user forgotten meanwhile are counted. The LLM side is a small deterministic stand-in here;
the end-to-end suite runs the tiny Llama and MiniLM."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import redis

from tests.redis_support import REDIS_URL
from tests.telemetry_support import RecordedTelemetry
from service.config import KnowledgeRefreshSettings
from service.engine.base import ForwardInterrupted
from service.history import (AppendResult, Event, HistorySettings, HistoryStore, KnowledgeRecord, KnowledgeStamp,
                             events_key)
from service.nearline.knowledge_refresh import KnowledgeRefresher, KnowledgeTarget, RefreshOutcome
from service.scoring.engine_scheduler import BackgroundOutcome, EngineScheduler

pytestmark = pytest.mark.anyio

TARGET = KnowledgeTarget("enc-a", 4)
EVERY = 5


class StandInSource:
    """Text = the history's items; vector = their count and sum. ``fail`` / ``interrupt_first``
    make generation fail or yield the first time; ``during`` runs inside generation."""

    def __init__(self, *, fail: bool = False, interrupt_first: bool = False, during=None) -> None:
        self.fail, self.interrupt_first, self.during = fail, interrupt_first, during
        self.generated: list[str] = []
        self.threads: set[str] = set()

    def target(self) -> KnowledgeTarget:
        return TARGET

    def generate(self, history, interrupted) -> str:
        self.threads.add(threading.current_thread().name)
        if self.interrupt_first and not self.generated:
            self.generated.append("<interrupted>")
            raise ForwardInterrupted("a request waits")
        if self.fail:
            raise RuntimeError("the LLM broke")
        if self.during is not None:
            self.during()
        text = " ".join(str(i) for i in history.items.tolist())
        self.generated.append(text)
        return text

    def encode(self, text: str, target: KnowledgeTarget) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        items = [float(t) for t in text.split()]
        return np.asarray([len(items), sum(items), 1.0, 0.0], np.float32)


def refresh_every(events: int) -> KnowledgeRefreshSettings:
    return KnowledgeRefreshSettings(knowledge_refresh_events=events)


class Setup:
    def __init__(self, prefix: str, source: StandInSource | None, *, every: int = EVERY) -> None:
        self.store = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=prefix,
                                                                redis_timeout_s=10.0))
        self.telemetry = RecordedTelemetry()
        self.background: list[BackgroundOutcome] = self.telemetry.of(BackgroundOutcome)
        self.scheduler = EngineScheduler(telemetry=self.telemetry)
        self.outcomes: list[RefreshOutcome] = self.telemetry.of(RefreshOutcome)
        self.queued: list[bool] = []
        self.source = source
        self.refresher = KnowledgeRefresher(
            self.store, refresh_every(every), target=lambda: TARGET, source=source,
            submit=self.scheduler.submit_background,
            telemetry=self.telemetry, retried=(ForwardInterrupted,))

    async def append(self, user: str, n: int, start: int) -> AppendResult:
        appended = await self.store.append_counted(user, [Event(100 + i, 4.0, start + i) for i in range(n)])
        self.queued.append(self.refresher.observe(user, appended))
        return appended

    async def settle(self, n_outcomes: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < n_outcomes and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(self.outcomes) >= n_outcomes, f"refresh outcomes {self.outcomes} after {timeout} s"

    async def close(self) -> None:
        self.refresher.close()
        self.scheduler.close()
        await self.store.aclose()


def stamp(events_at: int, encoder: str = "enc-a", dim: int = 4) -> KnowledgeStamp:
    return KnowledgeStamp(events_at, encoder, dim)


@pytest.mark.parametrize("count,knowledge,due", [
    (4, None, False), (5, None, True),  # no record: due once `every` events are stored
    (14, stamp(10), False), (15, stamp(10), True),  # `every` events since the record
    (5, stamp(3, encoder="enc-b"), True), (4, stamp(3, dim=8), False),  # another encoder counts as none
])
def test_a_refresh_is_due_every_so_many_events(count, knowledge, due) -> None:
    refresher = KnowledgeRefresher(None, refresh_every(EVERY), target=lambda: TARGET, source=None, submit=None)
    try:
        assert refresher.due(count, knowledge, TARGET) is due
        assert not refresher.due(100, None, None)  # a version without knowledge
    finally:
        refresher.close()
    off = KnowledgeRefresher(None, refresh_every(0), target=lambda: TARGET, source=None, submit=None)
    assert not off.due(100, None, TARGET)
    off.close()
    with pytest.raises(ValueError):
        KnowledgeRefresher(None, refresh_every(-1), target=lambda: TARGET, source=None, submit=None)


async def test_the_nth_event_queues_one_job_which_writes_the_new_record(redis_prefix) -> None:
    setup = Setup(redis_prefix, StandInSource())
    try:
        await setup.append("u1", EVERY - 1, start=1)
        await asyncio.sleep(0.2)
        assert setup.queued == [False] and setup.outcomes == [] and setup.background == []
        await setup.append("u1", 1, start=10)
        await setup.settle(1)
        first = (await setup.store.read("u1")).knowledge
        await setup.append("u1", EVERY - 1, start=20)  # not yet due again
        await asyncio.sleep(0.2)
        await setup.append("u1", 1, start=30)
        await setup.settle(2)
        second = (await setup.store.read("u1")).knowledge
    finally:
        await setup.close()
    assert setup.queued == [False, True, False, True]
    assert setup.outcomes == [RefreshOutcome.REFRESHED] * 2 and setup.background == ["scored"] * 2
    assert first.events_at == EVERY and first.encoder == "enc-a" and first.dim == 4
    np.testing.assert_array_equal(first.vector, [EVERY, 100 + 101 + 102 + 103 + 100, 1, 0])
    assert second.events_at == 2 * EVERY and second.generated_at >= first.generated_at
    np.testing.assert_array_equal(second.vector, [2 * EVERY, 2 * (100 + 101 + 102 + 103 + 100), 1, 0])
    assert abs(second.generated_at - time.time()) < 30
    # generation ran on the engine thread, encoding on the refresher's own
    assert setup.source.threads == {"engine", "knowledge_0"}


async def test_appends_while_a_job_waits_queue_nothing_more(redis_prefix) -> None:
    setup = Setup(redis_prefix, StandInSource())
    release = threading.Event()
    try:
        blocker = setup.scheduler.submit(lambda interrupted: release.wait(10), 1.0)  # a request holds the engine
        await setup.append("u1", EVERY, start=1)
        await setup.append("u1", 1, start=10)
        await setup.append("u1", 3, start=20)
        release.set()
        await asyncio.wrap_future(blocker)
        await setup.settle(1)
        await asyncio.sleep(0.2)
    finally:
        await setup.close()
    assert setup.queued == [True, False, False] and setup.outcomes == [RefreshOutcome.REFRESHED]
    assert len(setup.source.generated) == 1


async def test_a_job_that_yields_to_a_request_runs_again(redis_prefix) -> None:
    setup = Setup(redis_prefix, StandInSource(interrupt_first=True))
    try:
        await setup.append("u1", EVERY, start=1)
        await setup.settle(1)
        record = (await setup.store.read("u1")).knowledge
    finally:
        await setup.close()
    assert setup.source.generated[0] == "<interrupted>" and len(setup.source.generated) == 2
    assert setup.outcomes == [RefreshOutcome.REFRESHED] and record.events_at == EVERY


async def test_failures_are_counted_and_the_old_vector_stays(redis_prefix) -> None:
    setup = Setup(redis_prefix, StandInSource(fail=True))
    old = KnowledgeRecord(np.ones(4, np.float32), "enc-a", 0, 1.0)
    try:
        await setup.store.append("u1", [Event(1, 4.0, 1)])
        assert await setup.store.put_knowledge("u1", old)
        await setup.append("u1", EVERY, start=10)
        await setup.settle(1)
        kept = (await setup.store.read("u1")).knowledge
    finally:
        await setup.close()
    assert setup.outcomes == [RefreshOutcome.FAILED] and setup.background == ["failed"]
    np.testing.assert_array_equal(kept.vector, old.vector)


async def test_without_a_base_llm_a_due_refresh_is_unavailable_and_logged_once(redis_prefix, caplog) -> None:
    setup = Setup(redis_prefix, None)
    try:
        await setup.append("u1", EVERY - 1, start=1)
        await setup.append("u1", 1, start=10)
        await setup.append("u1", 1, start=20)
    finally:
        await setup.close()
    assert setup.queued == [False, False, False] and setup.background == []
    assert setup.outcomes == [RefreshOutcome.UNAVAILABLE] * 2
    assert sum("no base LLM" in r.getMessage() for r in caplog.records) == 1


async def test_a_user_forgotten_during_generation_is_not_revived(redis_prefix) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    setup = Setup(redis_prefix, StandInSource(during=lambda: client.delete(events_key(redis_prefix, "u1"))))
    try:
        await setup.append("u1", EVERY, start=1)
        await setup.settle(1)
        history = await setup.store.read("u1")
    finally:
        await setup.close()
        client.close()
    assert setup.outcomes == [RefreshOutcome.SUPERSEDED] and history.knowledge is None
