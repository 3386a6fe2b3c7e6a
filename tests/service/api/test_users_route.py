"""GET /v1/users/{user_id}/history against the real Redis: newest first, paged by an opaque cursor
that appends do not shift, the profile beside the events, and a 503 when Redis is down."""

from __future__ import annotations

import httpx
import pytest
from tests.service.api.api_support import DEAD_REDIS_URL, FormulaScorer, assert_error, serving

from service.api import build_app
from service.config import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.both_redis]  # the single node and the cluster

T0 = 1_700_000_000
HISTORY_KEYS = {"user_id", "exists", "events", "profile", "next_cursor"}


async def append(client: httpx.AsyncClient, user_id: str | int, items: range | list[int], start: int = T0) -> None:
    events = [{"item_id": item, "rating": 0.5 + (item % 10) / 2, "timestamp": start + i}
              for i, item in enumerate(items)]
    response = await client.post("/v1/events", json={"user_id": user_id, "events": events})
    assert response.status_code == 200, response.text


async def history(client: httpx.AsyncClient, user: str, **params) -> dict:
    response = await client.get(f"/v1/users/{user}/history", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == HISTORY_KEYS, body
    return body


async def all_pages(client: httpx.AsyncClient, user: str, limit: int) -> list[list[int]]:
    page = await history(client, user, limit=limit)
    pages = [[e["item_id"] for e in page["events"]]]
    while page["next_cursor"] is not None:
        page = await history(client, user, limit=limit, cursor=page["next_cursor"])
        pages.append([e["item_id"] for e in page["events"]])
    return pages


async def test_events_come_newest_first_with_the_profile(client: httpx.AsyncClient):
    await append(client, "alice", [11, 22, 33])
    assert (await client.put("/v1/users/alice/profile", json={"profile": {"age": "24"}})).status_code == 200
    body = await history(client, "alice")
    assert body == {"user_id": "alice", "exists": True, "profile": {"age": "24"}, "next_cursor": None,
                    "events": [{"item_id": 33, "rating": 2.0, "timestamp": T0 + 2},
                               {"item_id": 22, "rating": 1.5, "timestamp": T0 + 1},
                               {"item_id": 11, "rating": 1.0, "timestamp": T0}]}


async def test_ratings_read_back_as_sent_although_stored_as_float32(client: httpx.AsyncClient):
    events = [{"item_id": 1, "rating": 4.3, "timestamp": T0}, {"item_id": 2, "rating": 0.7, "timestamp": T0 + 1}]
    assert (await client.post("/v1/events", json={"user_id": "hank", "events": events})).status_code == 200
    assert [e["rating"] for e in (await history(client, "hank"))["events"]] == [0.7, 4.3]


async def test_pages_follow_the_cursor_to_the_oldest_event(client: httpx.AsyncClient):
    await append(client, "bob", range(1, 8))
    assert await all_pages(client, "bob", 3) == [[7, 6, 5], [4, 3, 2], [1]]
    assert await all_pages(client, "bob", 7) == [[7, 6, 5, 4, 3, 2, 1]]


async def test_appends_between_pages_do_not_shift_later_pages(client: httpx.AsyncClient):
    await append(client, "carol", range(1, 7))
    first = await history(client, "carol", limit=2)
    await append(client, "carol", [50, 51], start=T0 + 100)
    second = await history(client, "carol", limit=2, cursor=first["next_cursor"])
    fresh = await history(client, "carol", limit=2)
    assert [e["item_id"] for e in first["events"]] == [6, 5]
    assert [e["item_id"] for e in second["events"]] == [4, 3]
    assert [e["item_id"] for e in fresh["events"]] == [51, 50]


async def test_unknown_user_is_200_and_empty(client: httpx.AsyncClient):
    assert await history(client, "nobody") == {"user_id": "nobody", "exists": False, "events": [], "profile": {},
                                               "next_cursor": None}


async def test_profile_only_user_exists(client: httpx.AsyncClient):
    await client.put("/v1/users/dave/profile", json={"profile": {"gender": "M"}})
    body = await history(client, "dave")
    assert body["exists"] and body["events"] == [] and body["profile"] == {"gender": "M"}


async def test_default_limit_is_50(client: httpx.AsyncClient):
    await append(client, "erin", range(1, 101))
    await append(client, "erin", range(1, 11), start=T0 + 100)
    first = await history(client, "erin")
    assert len(first["events"]) == 50 and first["next_cursor"] is not None
    second = await history(client, "erin", cursor=first["next_cursor"], limit=1000)
    assert len(second["events"]) == 60 and second["next_cursor"] is None


async def test_integer_user_ids_read_back_as_their_string(client: httpx.AsyncClient):
    await append(client, 7, [1, 2])
    body = await history(client, "7")
    assert body["user_id"] == "7" and [e["item_id"] for e in body["events"]] == [2, 1]


@pytest.mark.parametrize("params,loc", [({"limit": 0}, "query.limit"), ({"limit": 1001}, "query.limit"),
                                        ({"limit": "ten"}, "query.limit"), ({"cursor": "abc"}, "query.cursor"),
                                        ({"cursor": "1.2.3"}, "query.cursor"), ({"cursor": ""}, "query.cursor")])
async def test_bad_paging_parameters_are_422(client: httpx.AsyncClient, params: dict, loc: str):
    error = assert_error(await client.get("/v1/users/u1/history", params=params), 422, "invalid_request")
    assert [d["loc"] for d in error["details"]] == [loc]


@pytest.mark.parametrize("user_id", ["a%7Bb%7D", "x" * 129, "a%20b"])
async def test_bad_user_id_in_path_is_422(client: httpx.AsyncClient, user_id: str):
    error = assert_error(await client.get(f"/v1/users/{user_id}/history"), 422)
    assert error["details"][0]["loc"] == "path.user_id"


async def test_cursor_past_the_end_is_an_empty_last_page(client: httpx.AsyncClient):
    await append(client, "frank", [1, 2])
    body = await history(client, "frank", cursor="2.999")
    assert body["events"] == [] and body["next_cursor"] is None and body["exists"]


async def test_redis_unreachable_is_503(settings: Settings, scorer: FormulaScorer):
    app = build_app(settings.replace(redis_url=DEAD_REDIS_URL), scorer=scorer)
    async with serving(app) as client:
        response = await client.get("/v1/users/gina/history")
    error = assert_error(response, 503, "history_unavailable")
    assert "retry" in error["message"] and response.headers["retry-after"] == "1"


async def test_route_is_labelled_by_its_template(client: httpx.AsyncClient, app):
    await client.get("/v1/users/secret-user-1/history")
    value = app.state.metrics.registry.get_sample_value(
        "reclora_http_request_duration_seconds_count",
        {"method": "GET", "route": "/v1/users/{user_id}/history", "status": "200"})
    assert value == 1
