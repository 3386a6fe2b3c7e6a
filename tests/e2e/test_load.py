"""Serving under load, over real HTTP and the real Redis: queue-aware LLM admission, shedding
with Retry-After past the in-flight bound, nearline LLM scores shared through Redis (hits equal
fresh scores; a new event or an activation misses), background scoring that never delays a
request which fits, and a dead Redis that degrades instead of failing."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
from tests.e2e.e2e_support import REDIS_URL, LiveServer, World, closed_port, metric_value

from service.engine.base import ForwardInterrupted
from service.history import decode_records, events_key

CANDIDATES = [3, 17, 25, 41, 58]


class GatedEngine:
    """The real engine that, while the gate is closed, holds a request's forward (and lets
    background forwards run until interrupted). ``expected_ms`` is what the pace would predict."""

    def __init__(self, inner, expected_ms: float | None = None) -> None:
        self.inner, self.expected = inner, expected_ms
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.forwards = self.background = self.interruptions = 0

    def score(self, adapter, prefix, suffixes, deadline=None, interrupted=None, embeds=None):
        self.entered.set()
        if interrupted is not None:
            self.background += 1
        else:
            self.forwards += 1
        limit = time.monotonic() + 10
        while not self.gate.is_set() and time.monotonic() < limit:
            if interrupted is not None and interrupted():
                self.interruptions += 1
                raise ForwardInterrupted("a request waits")
            time.sleep(0.005)
        return self.inner.score(adapter, prefix, suffixes, deadline, interrupted)

    def expected_ms(self, prefix, suffixes):
        return self.expected if self.expected is not None else self.inner.expected_ms(prefix, suffixes)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def cached(world: World):
    """A gateway with the LLM score cache on, as in production."""
    server = LiveServer.start(world.settings(llm_score_cache=True))
    yield server
    server.stop()


@pytest.fixture
def gated(cached: LiveServer, monkeypatch):
    engine = GatedEngine(cached.app.state.scorer.engine)
    monkeypatch.setattr(cached.app.state.scorer, "engine", engine)
    yield engine
    engine.gate.set()


def latest_timestamp(world: World, user: str) -> int:
    """The user's newest stored event time (other tests append too)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        _, _, stamps = decode_records(client.lrange(events_key(world.prefix, user), -1, -1))
    finally:
        client.close()
    return int(stamps[-1])


def score(client: httpx.Client, user: str, candidates=CANDIDATES, **extra) -> dict:
    response = client.post("/v1/score", json={"user_id": user, "candidates": candidates, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_queued_work_that_cannot_finish_in_time_degrades_at_once(world: World, cached: LiveServer, gated):
    gated.expected, gated.gate = 1000.0, threading.Event()  # each forward is predicted to take 1 s
    with cached.client() as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(score, client, world.users[0], deadline_ms=10_000)
        assert gated.entered.wait(10)
        started = time.perf_counter()
        body = score(client, world.users[1], deadline_ms=1500)  # 1 s of its own fits; 1 s queued ahead does not
        elapsed = time.perf_counter() - started
        gated.gate.set()
        assert first.result(15)["degraded"] is False
    assert body["degraded_reasons"] == ["llm_queue"], body
    assert all(s["llm_score"] is None for s in body["scores"])
    assert elapsed < 1.0, f"answered after {elapsed:.2f} s instead of at once"
    assert gated.forwards == 1  # the second request never started a forward


def test_past_the_in_flight_bound_score_requests_get_429_with_retry_after(world: World):
    server = LiveServer.start(world.settings(max_inflight_score=1, shed_retry_after_s=2))
    try:
        engine = GatedEngine(server.app.state.scorer.engine)
        engine.gate.clear()
        server.app.state.scorer.engine = engine
        with server.client() as client, ThreadPoolExecutor(1) as pool:
            first = pool.submit(score, client, world.users[0], deadline_ms=10_000)
            assert engine.entered.wait(10)
            started = time.perf_counter()
            shed = client.post("/v1/score", json={"user_id": world.users[1], "candidates": CANDIDATES})
            shed_s = time.perf_counter() - started
            ready = client.get("/readyz")
            engine.gate.set()
            assert first.result(15)["degraded"] is False
            after = client.post("/v1/score", json={"user_id": world.users[1], "candidates": CANDIDATES})
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    assert shed.status_code == 429 and shed.headers["retry-after"] == "2"
    error = shed.json()["error"]
    assert error["code"] == "overloaded" and error["request_id"] and "1 requests in flight" in error["message"]
    assert shed_s < 0.5
    assert ready.status_code == 200  # shedding is the healthy answer to overload
    assert after.status_code == 200  # the bound frees with the request
    assert metric_value(metrics, "reclora_shed_responses_total", {"route": "/v1/score"}) == 1
    assert metric_value(metrics, "reclora_http_request_duration_seconds_count",  # named, though never routed
                        {"route": "/v1/score", "status": "429"}) == 1


def test_a_cached_llm_score_fused_equals_the_fresh_one(world: World, cached: LiveServer, gated):
    user = world.users[2]
    with cached.client() as client:
        fresh = score(client, user, deadline_ms=10_000)
        forwards = gated.forwards
        again = score(client, user, deadline_ms=10_000)
    assert fresh["degraded"] is False and "llm" in fresh["timings"]
    assert again["degraded"] is False and "llm" not in again["timings"] and "llm_cache" in again["timings"]
    assert gated.forwards == forwards  # no forward: every candidate came from Redis
    assert [s["llm_score"] for s in again["scores"]] == [s["llm_score"] for s in fresh["scores"]]
    assert [s["score"] for s in again["scores"]] == [s["score"] for s in fresh["scores"]]


def test_an_appended_event_and_an_activation_each_miss(world: World, cached: LiveServer, gated):
    user = world.users[3]
    with cached.client() as client:
        score(client, user, deadline_ms=10_000)
        assert "llm" not in score(client, user, deadline_ms=10_000)["timings"]  # cached
        latest = latest_timestamp(world, user)
        ok = client.post("/v1/events", json={"user_id": user, "events": [
            {"item_id": 7, "rating": 5.0, "timestamp": latest + 60}]})
        assert ok.status_code == 200, ok.text
        forwards = gated.forwards
        after_event = score(client, user, deadline_ms=10_000)
        assert "llm" in after_event["timings"] and gated.forwards == forwards + 1  # the history changed: a miss
        assert "llm" not in score(client, user, deadline_ms=10_000)["timings"]

        pipeline = cached.app.state.scorer
        current = pipeline.holder.snapshot()
        pipeline.holder.swap(dataclasses.replace(current.model, version="e2e-activated"), current.builder)
        try:
            activated = score(client, user, deadline_ms=10_000)
        finally:
            pipeline.holder.swap(current.model, current.builder)
    assert activated["model_version"] == "e2e-activated"
    assert "llm" in activated["timings"] and gated.forwards == forwards + 2  # a new version: a miss


def test_background_scoring_fills_the_cache_and_never_delays_a_request_that_fits(world: World, cached: LiveServer,
                                                                                 gated):
    first_user, second_user = world.users[4], world.users[5]
    with cached.client() as client:
        gated.expected = 5_000.0  # too slow for the caller's deadline: CRM now, LLM in the background
        gated.gate.clear()  # the background forward will hold the engine until interrupted
        skipped = score(client, first_user, deadline_ms=1000)
        assert skipped["degraded_reasons"] == ["llm_overrun_expected"], skipped
        limit = time.monotonic() + 10
        while gated.background == 0 and time.monotonic() < limit:
            time.sleep(0.01)
        assert gated.background >= 1
        gated.expected = 50.0  # a request that fits arrives while the background work runs
        started = time.perf_counter()
        threading.Timer(0.3, gated.gate.set).start()  # the request's own forward may pass after 0.3 s
        fits = score(client, second_user, deadline_ms=3000)
        elapsed = time.perf_counter() - started
        assert fits["degraded"] is False, fits
        assert elapsed < 2.0
        assert gated.interruptions >= 1  # the background forward yielded the engine
        gated.expected = 5_000.0  # live scoring ruled out again: only the background can fill the cache
        limit = time.monotonic() + 10
        while time.monotonic() < limit:  # the re-queued background job completes and fills the cache
            body = score(client, first_user, deadline_ms=1000)
            if not body["degraded"]:
                break
            time.sleep(0.1)
    assert body["degraded"] is False and "llm" not in body["timings"], body
    assert all(s["llm_score"] is not None for s in body["scores"])


def test_a_dead_redis_leaves_scoring_degraded_but_answering(world: World):
    server = LiveServer.start(world.settings(llm_score_cache=True, redis_url=f"redis://127.0.0.1:{closed_port()}/0",
                                             history_budget_ms=200, llm_score_cache_budget_ms=200))
    try:
        with server.client() as client:
            body = score(client, world.users[0], deadline_ms=10_000)
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    assert body["cold_start"] is True and "history_unavailable" in body["degraded_reasons"], body
    assert all(s["llm_score"] is not None for s in body["scores"])  # the LLM still scored, live
    assert metric_value(metrics, "reclora_llm_score_cache_lookups_total", {"outcome": "error"}) == len(CANDIDATES)


def test_share_of_candidates_with_llm_scores_is_counted(world: World, cached: LiveServer, gated):
    with cached.client() as client:
        before = client.get("/metrics").text
        score(client, world.users[6], deadline_ms=10_000)
        score(client, world.users[6], deadline_ms=10_000)
        after = client.get("/metrics").text

    def delta(source: str) -> float:
        return (metric_value(after, "reclora_candidates_total", {"llm": source})
                - metric_value(before, "reclora_candidates_total", {"llm": source}))

    assert delta("live") == len(CANDIDATES) and delta("cached") == len(CANDIDATES) and delta("none") == 0
    admissions = metric_value(after, "reclora_llm_admissions_total", {"outcome": "cached"})
    assert admissions >= 1


def test_llm_scores_differ_per_user_even_when_cached(world: World, cached: LiveServer, gated):
    with cached.client() as client:
        a = [score(client, world.users[7], deadline_ms=10_000) for _ in range(2)]
        b = [score(client, world.users[8], deadline_ms=10_000) for _ in range(2)]
    llm = lambda body: np.array([s["llm_score"] for s in body["scores"]])  # noqa: E731
    np.testing.assert_array_equal(llm(a[0]), llm(a[1]))
    np.testing.assert_array_equal(llm(b[0]), llm(b[1]))
    assert not np.allclose(llm(a[1]), llm(b[1]), atol=1e-4)
