"""Degraded answers end to end: Redis unreachable, the LLM failing, a deadline too short for the LLM.

A score request still answers 200 in each case, says ``degraded`` and why, and falls back to
what can be computed (cold start without Redis, CRM scores without the LLM).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from tests.e2e.e2e_support import LiveServer, Reference, World, assert_error, closed_port, metric_value

CANDIDATES = [6, 21, 38, 52, 77]
CRM_ATOL = 1e-5


def column(body: dict, key: str) -> list:
    return [s[key] for s in body["scores"]]


def assert_crm_only(body: dict, reference: Reference, user: str) -> None:
    assert column(body, "llm_score") == [None] * len(CANDIDATES)
    assert column(body, "score") == column(body, "crm_score")
    np.testing.assert_allclose(column(body, "crm_score"), reference.crm(user, CANDIDATES).scores, atol=CRM_ATOL)


@pytest.fixture(scope="module")
def dead_redis(world: World) -> Iterator[LiveServer]:
    """The real service, model built by the lifespan, with its Redis URL on a port nobody listens on."""
    server = LiveServer.start(world.settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", redis_timeout_s=0.5))
    yield server
    server.stop()


def test_redis_unreachable_scores_as_cold_start_refuses_events_and_is_not_ready(
        world: World, dead_redis: LiveServer, reference: Reference) -> None:
    user = world.users[4]  # has a history in the (reachable) Redis, which this server cannot see
    with dead_redis.client() as http:
        response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["degraded"] is True and body["degraded_reasons"] == ["history_unavailable"]
        assert body["cold_start"] is True
        assert body["model_version"] == world.version
        scores = np.asarray(column(body, "score"))
        assert ((scores > 0) & (scores < 1)).all()
        # Scored exactly as a user without any history.
        np.testing.assert_allclose(column(body, "crm_score"), reference.crm("e2e-nobody", CANDIDATES).scores,
                                   atol=CRM_ATOL)

        events = http.post("/v1/events", json={"user_id": user, "events": [
            {"item_id": 6, "rating": 4.0, "timestamp": 1_700_000_000}]})
        assert_error(events, 503, "history_unavailable")
        assert "retry-after" in events.headers

        profile = http.put(f"/v1/users/{user}/profile", json={"profile": {"age": "25-34"}})
        assert_error(profile, 503, "history_unavailable")

        ready = http.get("/readyz")
        error = assert_error(ready, 503, "not_ready")
        assert [d["loc"] for d in error["details"]] == ["redis"], error

        metrics = http.get("/metrics").text
        assert metric_value(metrics, "reclora_degraded_responses_total", {"reason": "history_unavailable"}) == 1


def tampered_store(world: World, tmp_path) -> tuple[object, str]:
    """A copy of the model store whose CRM weights changed after export (one byte flipped)."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(world.store, store)
    weights = store / world.version / "crm" / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    return store, world.version


@pytest.mark.parametrize("problem", ["missing-version", "tampered-bundle"])
def test_a_model_that_cannot_load_keeps_the_service_not_ready(world: World, tmp_path, problem: str) -> None:
    if problem == "missing-version":
        settings = world.settings(active_version="e2e-missing-v9")
        expected = "does not exist"
    else:
        store, version = tampered_store(world, tmp_path)
        settings = world.settings(model_store=store, active_version=version)
        expected = "sha256 does not match"
    server = LiveServer.start(settings, require_model=False)
    try:
        assert server.app.state.scorer is None
        with server.client() as http:
            assert http.get("/livez").status_code == 200
            ready = assert_error(http.get("/readyz"), 503, "not_ready")
            model = [d for d in ready["details"] if d["loc"] == "model"]
            assert len(model) == 1 and "load failed" in model[0]["message"] and expected in model[0]["message"], ready
            assert [d["loc"] for d in ready["details"]] == ["model"]  # Redis itself is fine
            response = http.post("/v1/score", json={"user_id": world.users[0], "candidates": CANDIDATES})
            assert_error(response, 503, "model_not_ready")
    finally:
        server.stop()


def test_retrieval_failure_answers_with_crm_scores(world: World, live: LiveServer, http: httpx.Client,
                                                   reference: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retrieval and prompts run beside the CRM, on a thread of their own: a failure there still
    ends in the CRM's answer, not a 5xx."""
    user = world.users[12]  # a user no other test writes events for

    def failing(*args):
        raise RuntimeError("e2e: retrieval failed")

    monkeypatch.setattr("service.scoring.stages.retrieve_text_history", failing)
    response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is True and body["degraded_reasons"] == ["llm_error"]
    assert "crm" in body["timings"] and "llm" not in body["timings"]
    assert_crm_only(body, reference, user)


class ExplodingEngine:
    def score(self, *args, **kwargs):
        raise RuntimeError("e2e: the LLM engine failed")

    def expected_ms(self, *args) -> None:
        return None


def test_llm_failure_answers_with_crm_scores(world: World, live: LiveServer, http: httpx.Client,
                                             reference: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    user = world.users[4]
    metrics = http.get("/metrics").text
    errors0 = metric_value(metrics, "reclora_degraded_responses_total", {"reason": "llm_error"})
    monkeypatch.setattr(live.app.state.scorer, "engine", ExplodingEngine())

    response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is True and body["degraded_reasons"] == ["llm_error"]
    assert body["cold_start"] is False
    assert_crm_only(body, reference, user)
    metrics = http.get("/metrics").text
    assert metric_value(metrics, "reclora_degraded_responses_total", {"reason": "llm_error"}) == errors0 + 1

    monkeypatch.undo()  # the engine is back: the same request is answered by the LLM again
    healthy = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES}).json()
    assert healthy["degraded"] is False and None not in column(healthy, "llm_score")
    assert column(healthy, "crm_score") == column(body, "crm_score")


def test_deadline_too_short_for_the_llm_answers_with_crm_scores(world: World, http: httpx.Client,
                                                                reference: Reference) -> None:
    user = world.users[6]
    response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES, "deadline_ms": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is True
    assert len(body["degraded_reasons"]) == 1 and body["degraded_reasons"][0] in {"deadline", "llm_timeout"}, body
    assert body["cold_start"] is False
    assert "llm" not in body["timings"]
    assert_crm_only(body, reference, user)


class SlowEngine:
    """The real engine behind a delay, as when the engine is busy or the host overloaded."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def score(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return self.inner.score(*args, **kwargs)

    def expected_ms(self, *args) -> float | None:
        return self.inner.expected_ms(*args)  # unaware of the delay: the forward starts and overruns


class PacedEngine:
    """The real engine whose recent requests took ``pace_ms`` each; counts the forwards it runs."""

    def __init__(self, inner, pace_ms: float) -> None:
        self.inner, self.pace_ms, self.forwards = inner, pace_ms, 0

    def score(self, *args, **kwargs):
        self.forwards += 1
        return self.inner.score(*args, **kwargs)

    def expected_ms(self, *args) -> float:
        return self.pace_ms


def test_llm_expected_to_overrun_is_not_started(world: World, live: LiveServer, http: httpx.Client,
                                                reference: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    user = world.users[11]
    paced = PacedEngine(live.app.state.scorer.engine, pace_ms=5000.0)
    monkeypatch.setattr(live.app.state.scorer, "engine", paced)
    started = time.perf_counter()
    body = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES, "deadline_ms": 2000}).json()
    elapsed = time.perf_counter() - started
    assert body["degraded"] is True and body["degraded_reasons"] == ["llm_overrun_expected"], body
    assert paced.forwards == 0 and "llm" not in body["timings"]
    assert elapsed < 1.5, f"answered after {elapsed:.2f} s"
    assert_crm_only(body, reference, user)

    paced.pace_ms = 100.0  # fast enough again: the LLM runs
    body = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES, "deadline_ms": 5000}).json()
    assert body["degraded"] is False and paced.forwards == 1, body


def test_llm_slower_than_the_deadline_answers_with_crm_scores_at_the_deadline(
        world: World, live: LiveServer, http: httpx.Client, reference: Reference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    user, other = world.users[9], world.users[10]
    expected_other = http.post("/v1/score", json={"user_id": other, "candidates": CANDIDATES}).json()
    engine = live.app.state.scorer.engine
    monkeypatch.setattr(live.app.state.scorer, "engine", SlowEngine(engine, delay_s=2.0))

    started = time.perf_counter()
    response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES, "deadline_ms": 400})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is True
    # llm_timeout when the LLM stage started and overran; deadline if a loaded host spent the whole
    # budget before it. Either way the answer does not wait for the slow engine.
    assert body["degraded_reasons"] in (["llm_timeout"], ["deadline"]), body
    assert elapsed < 1.8, f"answered after {elapsed:.2f} s: the request waited for the engine"
    assert_crm_only(body, reference, user)

    monkeypatch.undo()
    # The abandoned forward leaves nothing behind: the next request (queued behind it) gets its own
    # user's LLM scores.
    after = http.post("/v1/score", json={"user_id": other, "candidates": CANDIDATES}).json()
    assert after["degraded"] is False, after
    np.testing.assert_allclose(column(after, "llm_score"), column(expected_other, "llm_score"), atol=1e-6)
