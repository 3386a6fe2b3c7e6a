"""Event and profile intake against the real Redis: order kept, nothing lost or half-written."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from tests.service.api.api_support import DEAD_REDIS_URL, FormulaScorer, assert_error, serving

from service.api import build_app
from service.config import Settings
from service.history import HistoryStore

pytestmark = [pytest.mark.anyio, pytest.mark.both_redis]  # the single node and the cluster

T0 = 1_700_000_000


def events(*triples: tuple[int, float, int]) -> list[dict]:
    return [{"item_id": i, "rating": r, "timestamp": t} for i, r, t in triples]


async def test_events_are_read_back_in_order(client: httpx.AsyncClient, app):
    first = await client.post("/v1/events", json={"user_id": "alice", "events": events(
        (10, 4.0, T0), (20, 2.5, T0 + 5), (30, 5.0, T0 + 5))})
    assert first.status_code == 200, first.text
    assert first.json() == {"appended": 3, "history_length": 3}
    second = await client.post("/v1/events", json={"user_id": "alice", "events": events((40, 1.0, T0 + 9))})
    assert second.json() == {"appended": 1, "history_length": 4}

    stored = await app.state.history.read("alice")
    assert stored.items.tolist() == [10, 20, 30, 40]
    np.testing.assert_allclose(stored.ratings, [4.0, 2.5, 5.0, 1.0])
    assert stored.timestamps.tolist() == [T0, T0 + 5, T0 + 5, T0 + 9]


async def test_events_are_stored_under_the_configured_prefix(client: httpx.AsyncClient, settings: Settings):
    await client.post("/v1/events", json={"user_id": "bob", "events": events((1, 3.0, T0))})
    other = HistoryStore.from_settings(settings.history.model_copy(update={"redis_prefix": ""}))  # no prefix
    try:
        assert not (await other.read("bob")).exists
    finally:
        await other.aclose()


async def test_older_events_are_409_and_nothing_is_written(client: httpx.AsyncClient, app):
    await client.post("/v1/events", json={"user_id": "carol", "events": events((1, 3.0, T0 + 100))})
    response = await client.post("/v1/events", json={"user_id": "carol", "events": events(
        (2, 3.0, T0 + 100), (3, 3.0, T0 + 50))})  # in-batch order is fine only for the first: 422
    assert_error(response, 422)
    response = await client.post("/v1/events", json={"user_id": "carol", "events": events((2, 3.0, T0 + 50))})
    error = assert_error(response, 409, "out_of_order")
    assert str(T0 + 50) in error["message"] and str(T0 + 100) in error["message"]
    assert (await app.state.history.read("carol")).items.tolist() == [1]


async def test_events_at_the_batch_limit_and_near_now_are_accepted(client: httpx.AsyncClient):
    now = int(time.time())
    batch = events(*[(1 + i % 100, 3.0, now - 100 + i) for i in range(99)], (5, 3.0, now + 3600))
    response = await client.post("/v1/events", json={"user_id": "dave", "events": batch})
    assert response.status_code == 200, response.text
    assert response.json()["appended"] == 100


async def test_appended_events_are_counted_in_metrics(client: httpx.AsyncClient, app):
    await client.post("/v1/events", json={"user_id": "erin", "events": events((1, 3.0, T0), (2, 4.0, T0 + 1))})
    assert app.state.metrics.registry.get_sample_value("reclora_events_appended_total") == 2


async def test_profile_is_replaced(client: httpx.AsyncClient, app):
    first = await client.put("/v1/users/frank/profile", json={"profile": {"age": "24", "gender": "M"}})
    assert first.status_code == 200 and first.json() == {"user_id": "frank", "fields": 2}
    await client.put("/v1/users/frank/profile", json={"profile": {"occupation": "writer"}})
    assert (await app.state.history.read("frank")).profile == {"occupation": "writer"}
    await client.put("/v1/users/frank/profile", json={"profile": {}})
    assert (await app.state.history.read("frank")).profile == {}


async def test_redis_unreachable_is_503_for_events_and_profile(settings: Settings, scorer: FormulaScorer):
    app = build_app(settings.replace(redis_url=DEAD_REDIS_URL), scorer=scorer)
    async with serving(app) as client:
        response = await client.post("/v1/events", json={"user_id": "gina", "events": events((1, 3.0, T0))})
        error = assert_error(response, 503, "history_unavailable")
        assert "nothing was written" in error["message"] and response.headers["retry-after"]
        assert app.state.metrics.registry.get_sample_value("reclora_events_appended_total") == 0
        assert_error(await client.put("/v1/users/gina/profile", json={"profile": {"a": "b"}}), 503,
                     "history_unavailable")
