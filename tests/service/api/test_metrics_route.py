"""GET /metrics: the app's own registry, request and stage histograms, no user ids."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.scoring.contracts import Stage

pytestmark = pytest.mark.anyio

SECRET_USER = "user-secret-4711"


async def test_metrics_expose_histograms_without_user_ids(client: httpx.AsyncClient, app):
    app.state.metrics.measure(Stage.LLM, 12.5)  # what the scoring pipeline reports
    await client.post("/v1/score", json={"user_id": SECRET_USER, "candidates": [1, 2]})
    await client.put(f"/v1/users/{SECRET_USER}/profile", json={"profile": {}})
    await client.post("/v1/score", json={"user_id": SECRET_USER, "candidates": []})
    await client.get(f"/no/such/{SECRET_USER}")

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    assert SECRET_USER not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    requests = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
                for s in families["reclora_http_request_duration_seconds"].samples if s.name.endswith("_count")}
    assert requests[("POST", "/v1/score", "200")] == 1
    assert requests[("POST", "/v1/score", "422")] == 1
    assert requests[("PUT", "/v1/users/{user_id}/profile", "200")] == 1
    assert requests[("GET", "unmatched", "404")] == 1

    stages = {s.labels["stage"]: s.value for s in families["reclora_stage_duration_seconds"].samples
              if s.name.endswith("_count")}
    assert set(stages) >= {"history", "retrieval", "crm", "adapter", "llm", "total"}
    assert stages["llm"] == 1
    assert "reclora_degraded_responses" in families and "reclora_adapter_cache_hits" in families
    [model] = families["reclora_model_info"].samples
    assert model.labels == {"version": "formula-v1"} and model.value == 1


async def test_openmetrics_on_request(client: httpx.AsyncClient):
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


async def test_each_app_has_its_own_registry(app, settings, scorer):
    from service.api import build_app

    other = build_app(settings, scorer=scorer)
    assert other.state.metrics.registry is not app.state.metrics.registry
