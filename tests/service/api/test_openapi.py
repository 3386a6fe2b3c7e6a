"""The published OpenAPI document tells the truth: exact int64 bounds (a bound a client can trust
is one the server accepts), user ids as ``string | integer``, the profile's closed key set, and the
history route's parameters and answer exactly as clients read them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.service.api.api_support import assert_error

from service.api.fields import INT64_MAX, INT64_MIN, exact_integer_bounds

pytestmark = pytest.mark.anyio

BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def schemas_in(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from schemas_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from schemas_in(value)


@pytest.fixture
async def spec(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


async def test_integer_bounds_are_exact_integers(spec: dict[str, Any]):
    integer_schemas = [s for s in schemas_in(spec) if s.get("type") == "integer"]
    bounds = [s[key] for s in integer_schemas for key in BOUNDS if key in s]
    assert bounds and all(type(b) is int for b in bounds), bounds
    item_id = spec["components"]["schemas"]["ScoreRequest"]["properties"]["candidates"]["items"]
    assert (item_id["minimum"], item_id["maximum"]) == (0, INT64_MAX)
    timestamp = spec["components"]["schemas"]["EventIn"]["properties"]["timestamp"]
    assert (timestamp["exclusiveMinimum"], timestamp["maximum"]) == (0, INT64_MAX)


async def test_the_published_maximum_id_is_accepted_by_type(client: httpx.AsyncClient, spec: dict[str, Any]):
    maximum = spec["components"]["schemas"]["ScoreRequest"]["properties"]["candidates"]["items"]["maximum"]
    error = assert_error(await client.post("/v1/score", json={"user_id": "u1", "candidates": [maximum]}), 422,
                         "unknown_items")  # past the type check: only the catalog refuses it
    assert error["details"] == [{"loc": "candidates[0]", "message": f"unknown item {INT64_MAX}",
                                 "type": "unknown_item"}]
    beyond = assert_error(await client.post("/v1/score", json={"user_id": "u1", "candidates": [maximum + 1]}), 422)
    assert beyond["details"][0]["type"] == "less_than_equal"


@pytest.mark.parametrize("model", ["ScoreRequest", "EventsRequest"])
async def test_user_ids_in_bodies_are_string_or_int64(spec: dict[str, Any], model: str):
    user_id = spec["components"]["schemas"][model]["properties"]["user_id"]
    string, integer = user_id["anyOf"]
    assert (string["type"], string["minLength"], string["maxLength"]) == ("string", 1, 128)
    assert string["pattern"] == "^[A-Za-z0-9._:@-]+$"
    assert integer == {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}


async def test_profile_refuses_keys_off_its_pattern_and_says_so(client: httpx.AsyncClient, spec: dict[str, Any]):
    profile = spec["components"]["schemas"]["ProfileRequest"]["properties"]["profile"]
    assert profile["additionalProperties"] is False
    assert profile["patternProperties"] == {"^[A-Za-z0-9_.-]+$": {"type": "string", "maxLength": 256}}
    assert profile["propertyNames"] == {"minLength": 1, "maxLength": 64} and profile["maxProperties"] == 64
    # What the schema now says is what the server does: a key off the pattern is refused.
    assert_error(await client.put("/v1/users/u1/profile", json={"profile": {"a b": "x"}}), 422)
    assert (await client.put("/v1/users/u1/profile", json={"profile": {"a.b-c_9": "x"}})).status_code == 200


async def test_history_route_is_published_as_clients_read_it(spec: dict[str, Any]):
    operation = spec["paths"]["/v1/users/{user_id}/history"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {"user_id", "limit", "cursor"} and params["user_id"]["in"] == "path"
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50,
                                         "description": "Events per page.", "title": "Limit"}
    assert set(operation["responses"]) == {"200", "422", "503"}
    answer = spec["components"]["schemas"]["HistoryResponse"]
    assert set(answer["required"]) == {"user_id", "exists", "events", "profile", "next_cursor"}
    event = spec["components"]["schemas"]["HistoryEvent"]["properties"]
    assert {name: p["type"] for name, p in event.items()} == {"item_id": "integer", "rating": "number",
                                                              "timestamp": "integer"}


def test_bounds_a_float_cannot_carry_are_refused_not_published_wrong():
    doc = {"a": {"type": "integer", "maximum": float(2**63), "minimum": float(-(2**63))},
           "b": [{"type": ["integer", "null"], "exclusiveMinimum": 0.0, "maximum": 1000.0}],
           "c": {"type": "number", "maximum": 1.5}}
    assert exact_integer_bounds(doc) == {
        "a": {"type": "integer", "maximum": INT64_MAX, "minimum": INT64_MIN},
        "b": [{"type": ["integer", "null"], "exclusiveMinimum": 0, "maximum": 1000}],
        "c": {"type": "number", "maximum": 1.5}}
    with pytest.raises(ValueError, match="exactly"):
        exact_integer_bounds({"type": "integer", "maximum": float(2**60 + 1)})
