"""/livez and /readyz: ready only with a model, a reachable Redis, and while not draining."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from tests.service.api.api_support import DEAD_REDIS_URL, FormulaScorer, assert_error, serving

from service.api import build_app
from service.api.lifecycle import Runtime
from service.config import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.both_redis]  # the single node and the cluster


async def test_ready_with_model_and_redis(client):
    assert (await client.get("/livez")).json() == {"status": "alive"}
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model_version": "formula-v1", "components": {
        "model": {"ok": True, "detail": "version formula-v1"}, "redis": {"ok": True, "detail": "ping ok"}},
        "llm_replicas": {}}


async def test_not_ready_when_redis_is_unreachable(settings: Settings, scorer: FormulaScorer):
    app = build_app(settings.replace(redis_url=DEAD_REDIS_URL), scorer=scorer)
    async with serving(app) as client:
        assert (await client.get("/livez")).status_code == 200
        error = assert_error(await client.get("/readyz"), 503, "not_ready")
        assert [(d["loc"], d["type"]) for d in error["details"]] == [("redis", "not_ready")]


def failing_runtime(settings, metrics, history) -> Runtime:
    raise FileNotFoundError("no model bundle in /nowhere: export one with `reclora export`")


async def test_not_ready_when_the_runtime_fails_to_build(settings: Settings):
    async with serving(build_app(settings, runtime=failing_runtime)) as client:
        for _ in range(100):
            error = assert_error(await client.get("/readyz"), 503, "not_ready")
            if "load failed" in error["message"]:
                break
            await asyncio.sleep(0.01)
        assert "FileNotFoundError: no model bundle in /nowhere" in error["message"]
        assert (await client.get("/livez")).status_code == 200


@pytest.fixture
def gated_runtime():
    """A runtime factory that waits for the test's go-ahead, recording what it was given."""
    factory = SimpleNamespace(built=[], gate=threading.Event())

    def build(settings, metrics, history) -> Runtime:
        factory.gate.wait(5)
        scorer = FormulaScorer(history=history, version="loaded-v2")
        factory.built.append((settings, metrics, scorer))
        return Runtime(scorer=scorer)

    factory.build = build
    return factory


async def test_model_loads_in_the_background(settings: Settings, gated_runtime):
    app = build_app(settings, runtime=gated_runtime.build)
    async with serving(app) as client:
        error = assert_error(await client.get("/readyz"), 503, "not_ready")
        assert {"loc": "model", "message": "loading", "type": "not_ready"} in error["details"]
        gated_runtime.gate.set()
        for _ in range(200):
            response = await client.get("/readyz")
            if response.status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert response.json()["model_version"] == "loaded-v2"
        built_settings, built_metrics, scorer = gated_runtime.built[0]
        assert built_settings is settings and built_metrics is app.state.metrics and scorer.history is app.state.history
        assert app.state.metrics.registry.get_sample_value("reclora_model_info", {"version": "loaded-v2"}) == 1
    assert scorer.closed  # built by the lifespan, so closed by it


async def test_injected_scorer_is_not_closed(settings: Settings, scorer: FormulaScorer):
    async with serving(build_app(settings, scorer=scorer)):
        pass
    assert not scorer.closed


async def test_not_ready_while_draining(client, app):
    app.state.lifecycle.begin_drain()
    error = assert_error(await client.get("/readyz"), 503, "not_ready")
    assert {"loc": "server", "message": "shutting down", "type": "not_ready"} in error["details"]
    response = await client.post("/v1/score", json={"user_id": "u1", "candidates": [1]})
    assert response.status_code == 200  # in-flight and late requests are still served while draining


def replica_health() -> dict[str, bool]:
    """Remote replicas as the vLLM engine reports them."""
    return {"http://vllm-0:8000": True, "http://vllm-1:8000": False}


async def test_llm_replicas_are_reported_but_do_not_decide_readiness(settings: Settings, scorer: FormulaScorer):
    app = build_app(settings, runtime=lambda settings, metrics, history: Runtime(scorer, replica_health=replica_health))
    async with serving(app) as client:
        for _ in range(200):
            if app.state.scorer is not None:
                break
            await asyncio.sleep(0.01)
        response = await client.get("/readyz")
    assert response.status_code == 200  # one replica down (or all): the gateway still answers, degraded
    assert response.json()["llm_replicas"] == {
        "http://vllm-0:8000": {"ok": True, "detail": "up"},
        "http://vllm-1:8000": {"ok": False, "detail": "down (requests re-routed)"}}
