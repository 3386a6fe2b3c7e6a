"""EngineScheduler: requests before background work, background work yields and is re-queued,
de-duplicated, bounded, aged out; the backlog admission reads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from service.config import BackgroundSettings
from service.engine.base import EngineCall, ForwardInterrupted, LoRABanks, UserMixture
from service.scoring.engine_scheduler import (BackgroundOutcome, EngineScheduler, RequestWorkOutcome,
                                              set_thread_intra_op_threads)
from tests.telemetry_support import RecordedTelemetry


class Recorder(RecordedTelemetry):
    @property
    def outcomes(self) -> list[BackgroundOutcome]:
        return self.of(BackgroundOutcome)

    @property
    def abandoned(self) -> float:
        return self.total(RequestWorkOutcome.ABANDONED)

    @property
    def expired(self) -> float:
        return self.total(RequestWorkOutcome.EXPIRED)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def scheduler(recorder):
    s = EngineScheduler(BackgroundSettings(background_max_jobs=3, background_max_age_s=30.0), telemetry=recorder)
    yield s
    s.close()


def blocker():
    """Work that holds the engine until released; ``entered`` is set once it runs."""
    entered, release = threading.Event(), threading.Event()

    def work(interrupted):
        entered.set()
        assert release.wait(10)
        return "held"

    return work, entered, release


def test_requests_run_in_arrival_order_before_background_work(scheduler):
    order: list[str] = []
    hold, entered, release = blocker()
    first = scheduler.submit(hold, 50.0)
    assert entered.wait(5)
    scheduler.submit_background("b1", lambda interrupted: order.append("b1"), 10.0)
    futures = [scheduler.submit(lambda interrupted, i=i: order.append(f"r{i}"), 10.0) for i in range(3)]
    release.set()
    assert first.result(5) == "held"
    for f in futures:
        f.result(5)
    deadline = time.monotonic() + 5
    while "b1" not in order and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["r0", "r1", "r2", "b1"]


def test_backlog_counts_queued_requests_and_the_rest_of_the_running_one(scheduler):
    assert scheduler.backlog_ms() == 0.0
    hold, entered, release = blocker()
    scheduler.submit(hold, 1000.0)
    assert entered.wait(5)
    queued = scheduler.submit(lambda interrupted: None, 300.0)
    scheduler.submit_background("b", lambda interrupted: None, 5000.0)  # background counts nothing
    backlog = scheduler.backlog_ms()
    assert 1000.0 < backlog <= 1300.0
    assert scheduler.depth() == (2, 1)
    release.set()
    queued.result(5)


def test_background_work_yields_to_a_request_and_runs_again_later(scheduler, recorder):
    runs: list[str] = []
    started = threading.Event()

    def background(interrupted):
        runs.append("start")
        started.set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if interrupted():
                runs.append("interrupted")
                raise ForwardInterrupted("a request waits")
            if runs.count("start") >= 2:  # the second run: finish
                return
            time.sleep(0.005)
        raise AssertionError("never interrupted")

    assert scheduler.submit_background("job", background, 100.0)
    assert started.wait(5)
    t0 = time.perf_counter()
    assert scheduler.submit(lambda interrupted: "request", 10.0).result(5) == "request"
    assert time.perf_counter() - t0 < 1.0  # it did not wait for the background work to finish
    deadline = time.monotonic() + 5
    while "scored" not in recorder.outcomes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs[:3] == ["start", "interrupted", "start"] and recorder.outcomes == ["scored"]


def test_background_jobs_are_deduplicated_bounded_and_the_oldest_dropped(scheduler, recorder):
    hold, entered, release = blocker()
    scheduler.submit(hold, 10.0)
    assert entered.wait(5)
    done: list[str] = []
    assert scheduler.submit_background("a", lambda interrupted: done.append("a"), 1.0)
    assert not scheduler.submit_background("a", lambda interrupted: done.append("a again"), 1.0)
    for key in ("b", "c", "d"):  # the queue holds 3: "a" goes
        assert scheduler.submit_background(key, lambda interrupted, key=key: done.append(key), 1.0)
    assert recorder.outcomes == ["dropped"]
    release.set()
    deadline = time.monotonic() + 5
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == ["b", "c", "d"]


def test_stale_background_jobs_are_dropped(recorder):
    scheduler = EngineScheduler(BackgroundSettings(background_max_age_s=0.05), telemetry=recorder)
    try:
        hold, entered, release = blocker()
        scheduler.submit(hold, 10.0)
        assert entered.wait(5)
        ran: list[str] = []
        scheduler.submit_background("old", lambda interrupted: ran.append("old"), 1.0)
        time.sleep(0.1)
        release.set()
        deadline = time.monotonic() + 5
        while not recorder.outcomes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder.outcomes == ["expired"] and ran == []
    finally:
        scheduler.close()


def test_late_requests_are_not_started_and_overruns_are_counted(scheduler, recorder):
    hold, entered, release = blocker()
    scheduler.submit(hold, 10.0)
    assert entered.wait(5)
    ran: list[str] = []
    late = scheduler.submit(lambda interrupted: ran.append("late"), 10.0, deadline=time.perf_counter() + 0.01)
    time.sleep(0.05)
    release.set()
    with pytest.raises(TimeoutError):
        late.result(5)
    assert ran == [] and recorder.expired == 1

    def overrun(interrupted):
        raise TimeoutError("the deadline passed during the forward")

    with pytest.raises(TimeoutError):
        scheduler.submit(overrun, 10.0).result(5)
    assert recorder.abandoned == 1


def test_a_cancelled_request_is_skipped(scheduler):
    hold, entered, release = blocker()
    scheduler.submit(hold, 10.0)
    assert entered.wait(5)
    ran: list[str] = []
    gone = scheduler.submit(lambda interrupted: ran.append("gone"), 10.0)
    assert gone.cancel()
    after = scheduler.submit(lambda interrupted: ran.append("after"), 10.0)
    release.set()
    after.result(5)
    assert ran == ["after"]


def in_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(10)
    return out[0]


def test_the_engine_thread_computes_with_its_own_intra_op_threads():
    """torch's count is per thread, and setting one also sets the count new threads begin with:
    the engine's thread gets its count, and the caller and threads started later keep theirs."""
    set_thread_intra_op_threads(1)
    s = EngineScheduler(intra_op_threads=3)
    try:
        assert s.submit(lambda interrupted: torch.get_num_threads(), 1.0).result(10) == 3
        assert torch.get_num_threads() == 1
        assert in_new_thread(torch.get_num_threads) == 1
    finally:
        s.close()


def test_without_a_count_the_engine_thread_begins_as_new_threads_do():
    set_thread_intra_op_threads(2)
    s = EngineScheduler()
    try:
        assert s.submit(lambda interrupted: torch.get_num_threads(), 1.0).result(10) == 2
    finally:
        s.close()



class PackingEngine:
    """Records the calls of every forward; each call's scores are its tokens' count per suffix."""

    mixes_in_forward = True

    def __init__(self) -> None:
        self.forwards: list[list[str]] = []

    def score(self, adapter, prefix, suffixes, deadline=None, interrupted=None, embeds=None):
        return self.score_many([EngineCall(adapter, prefix, suffixes, deadline)], interrupted)[0]

    def score_many(self, calls, interrupted=None):
        self.forwards.append([call.adapter.key for call in calls])
        return [np.full(len(call.suffixes), float(len(call.prefix))) for call in calls]


def banks(key: str) -> LoRABanks:
    return LoRABanks(key, ("q",), (torch.zeros(1, 2, 1),), (torch.zeros(1, 1, 2),), 1.0)


def call(user: str, version: str = "v1", tokens: int = 100) -> EngineCall:
    mixture = UserMixture(user, banks(version), torch.ones(1, 1), user_id=user)
    return EngineCall(mixture, list(range(tokens - 10)), [[1] * 5, [2] * 5])


def test_waiting_requests_of_one_version_share_a_forward_within_the_token_budget(recorder):
    engine = PackingEngine()
    s = EngineScheduler(BackgroundSettings(engine_pack_tokens=300), telemetry=recorder)
    try:
        hold, entered, release = blocker()
        held = s.submit(hold, 10.0)
        assert entered.wait(5)
        futures = [s.submit_call(engine, call(f"u{i}"), 10.0) for i in range(4)]
        futures.append(s.submit_call(engine, call("other", version="v2"), 10.0))
        scored: list[str] = []
        s.submit_background_call("bg", engine, call("bg"), lambda scores: scored.append("bg"), 10.0)
        futures.append(s.submit_call(engine, call("u4"), 10.0))
        release.set()
        assert held.result(5) == "held"
        for f in futures:
            assert list(f.result(5)) == [90.0, 90.0]
        deadline = time.monotonic() + 5
        while not scored and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        s.close()
    # three calls of 100 tokens fill the 300-token budget; v2 never joins v1; background runs alone, last
    assert engine.forwards == [["u0", "u1", "u2"], ["u3", "u4"], ["other"], ["bg"]]
    assert scored == ["bg"] and recorder.outcomes == [BackgroundOutcome.SCORED]


def test_background_calls_share_a_forward_and_requests_never_join_them(recorder):
    engine = PackingEngine()
    s = EngineScheduler(BackgroundSettings(engine_pack_tokens=1000), telemetry=recorder)
    try:
        hold, entered, release = blocker()
        s.submit_background("hold", hold, 0.0)
        assert entered.wait(5)
        done: list[str] = []
        for i in range(3):
            s.submit_background_call(f"k{i}", engine, call(f"b{i}"), lambda scores, i=i: done.append(f"b{i}"), 0.0)
        request = s.submit_call(engine, call("r"), 10.0)
        release.set()
        assert list(request.result(5)) == [90.0, 90.0]
        deadline = time.monotonic() + 5
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        s.close()
    assert engine.forwards == [["r"], ["b0", "b1", "b2"]] and done == ["b0", "b1", "b2"]


def test_no_budget_runs_one_request_per_forward(recorder):
    engine = PackingEngine()
    s = EngineScheduler(BackgroundSettings(engine_pack_tokens=0), telemetry=recorder)
    try:
        hold, entered, release = blocker()
        s.submit(hold, 10.0)
        assert entered.wait(5)
        futures = [s.submit_call(engine, call(f"u{i}"), 10.0) for i in range(3)]
        release.set()
        for f in futures:
            f.result(5)
    finally:
        s.close()
    assert engine.forwards == [["u0"], ["u1"], ["u2"]]
