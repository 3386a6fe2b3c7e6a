"""Every kind of bad input gets a 422 in the one error schema, pointing at the offending field;
never a 500, and nothing reaches the scorer or the store."""

from __future__ import annotations

import time

import httpx
import pytest

from service.history import HistoryStore
from tests.service.api.api_support import FormulaScorer, assert_error

pytestmark = pytest.mark.anyio

INT64_MAX = 2**63 - 1
NOW = int(time.time())


def score_body(**overrides) -> dict:
    return {"user_id": "u1", "candidates": [1, 2, 3], "deadline_ms": 300} | overrides


def event(**overrides) -> dict:
    return {"item_id": 5, "rating": 4.0, "timestamp": NOW - 100} | overrides


def events_body(*events: dict, user_id: str = "u1") -> dict:
    return {"user_id": user_id, "events": list(events) or [event()]}


# (case id, JSON body, expected detail loc, substring expected in that detail's message)
SCORE_CASES = [
    ("empty candidates", score_body(candidates=[]), "candidates", "at least 1"),
    ("too many candidates", score_body(candidates=list(range(1, 102))), "candidates", "at most 100"),
    ("duplicates", score_body(candidates=[1, 2, 1, 3, 2]), "candidates", "duplicate item ids: 1, 2"),
    ("negative id", score_body(candidates=[1, -4]), "candidates[1]", "greater than or equal to 0"),
    ("id beyond int64", score_body(candidates=[1, INT64_MAX + 1]), "candidates[1]", "less than or equal to"),
    ("id far beyond int64", score_body(candidates=[10**30]), "candidates[0]", "less than or equal to"),
    ("id as string", score_body(candidates=[1, "2"]), "candidates[1]", "valid integer"),
    ("id as float", score_body(candidates=[1.5]), "candidates[0]", "valid integer"),
    ("id as whole float", score_body(candidates=[2.0]), "candidates[0]", "valid integer"),
    ("id as bool", score_body(candidates=[True]), "candidates[0]", "valid integer"),
    ("id as null", score_body(candidates=[None]), "candidates[0]", "valid integer"),
    ("candidates not a list", score_body(candidates=7), "candidates", "valid list"),
    ("missing candidates", {"user_id": "u1"}, "candidates", "Field required"),
    ("missing user", {"candidates": [1]}, "user_id", "Field required"),
    ("user id empty", score_body(user_id=""), "user_id", "at least 1"),
    ("user id too long", score_body(user_id="u" * 129), "user_id", "at most 128"),
    ("user id with brace", score_body(user_id="a{b}"), "user_id", "pattern"),
    ("user id with space", score_body(user_id="a b"), "user_id", "pattern"),
    ("user id as bool", score_body(user_id=True), "user_id", "valid string or integer"),
    ("user id as float", score_body(user_id=123.0), "user_id", "valid string or integer"),
    ("user id as null", score_body(user_id=None), "user_id", "valid string or integer"),
    ("user id beyond int64", score_body(user_id=INT64_MAX + 1), "user_id", "less than or equal to"),
    ("deadline zero", score_body(deadline_ms=0), "deadline_ms", "greater than 0"),
    ("deadline negative", score_body(deadline_ms=-5), "deadline_ms", "greater than 0"),
    ("deadline too long", score_body(deadline_ms=10_001), "deadline_ms", "at most 10000"),
    ("deadline beyond int64", score_body(deadline_ms=2**70), "deadline_ms", "at most 10000"),
    ("deadline as string", score_body(deadline_ms="fast"), "deadline_ms", "valid integer"),
    ("deadline as float", score_body(deadline_ms=1.5), "deadline_ms", "valid integer"),
    ("unknown field", score_body(deadline=300), "deadline", "Extra inputs"),
    ("body not an object", [1, 2, 3], "body", "the body must be a JSON object, got an array"),
]


@pytest.mark.parametrize("body,loc,message", [c[1:] for c in SCORE_CASES], ids=[c[0] for c in SCORE_CASES])
async def test_bad_score_request_is_422(client: httpx.AsyncClient, scorer: FormulaScorer, body, loc, message):
    error = assert_error(await client.post("/v1/score", json=body), 422)
    matching = [d for d in error["details"] if d["loc"] == loc]
    assert matching, error
    assert any(message in d["message"] for d in matching), error
    assert message in error["message"]
    assert not scorer.calls


async def test_unknown_items_are_listed_with_their_positions(client: httpx.AsyncClient, scorer: FormulaScorer):
    error = assert_error(await client.post("/v1/score", json=score_body(candidates=[3, 555, 7, 0, 101])), 422,
                         "unknown_items")
    assert [(d["loc"], d["type"]) for d in error["details"]] == [
        ("candidates[1]", "unknown_item"), ("candidates[3]", "unknown_item"), ("candidates[4]", "unknown_item")]
    assert "0, 101, 555" in error["message"] and "formula-v1" in error["message"]
    assert not scorer.calls


async def test_all_problems_are_reported_at_once(client: httpx.AsyncClient):
    error = assert_error(await client.post("/v1/score", json={"user_id": "", "candidates": [-1, "x"]}), 422)
    assert {d["loc"] for d in error["details"]} == {"user_id", "candidates[0]", "candidates[1]"}


@pytest.mark.parametrize("raw", [b'{"user_id": "u1", "candidates": [1, 2,', b"{'user_id': 'u1'}", b"not json",
                                 b'{"user_id": "u1", "candidates": [1]} trailing'])
async def test_malformed_json_is_422(client: httpx.AsyncClient, raw: bytes):
    response = await client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert error["details"][0]["loc"] == "body" and error["details"][0]["type"] == "json_invalid"
    assert "invalid JSON" in error["message"]


async def test_number_too_long_to_parse_is_422(client: httpx.AsyncClient):
    raw = b'{"user_id": "u1", "candidates": [' + b"9" * 5000 + b"]}"
    response = await client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert error["details"][0]["type"] == "json_invalid"
    assert "digits" in error["message"]


async def test_invalid_utf8_is_422(client: httpx.AsyncClient):
    response = await client.post("/v1/score", content=b'{"user_id": "\xff"}',
                                 headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


async def test_empty_body_is_422(client: httpx.AsyncClient):
    response = await client.post("/v1/score", content=b"", headers={"content-type": "application/json"})
    error = assert_error(response, 422)
    assert error["details"][0]["loc"] is None and "required" in error["message"]


async def test_non_json_content_type_is_422(client: httpx.AsyncClient):
    response = await client.post("/v1/score", content=b'{"user_id": "u1", "candidates": [1]}',
                                 headers={"content-type": "text/plain"})
    assert_error(response, 422)


@pytest.mark.parametrize("path,method", [("/v1/score", "POST"), ("/v1/events", "POST"),
                                         ("/v1/users/u1/profile", "PUT")])
@pytest.mark.parametrize("raw,kind", [(b"null", "null"), (b"[]", "an array"), (b'"u1"', "a string"),
                                      (b"7", "a number"), (b"true", "a boolean")])
async def test_body_that_is_not_an_object_says_so(client: httpx.AsyncClient, scorer: FormulaScorer, path: str,
                                                  method: str, raw: bytes, kind: str):
    response = await client.request(method, path, content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert error["details"] == [{"loc": "body", "type": "body_not_object",
                                 "message": f"the body must be a JSON object, got {kind}"}]
    assert not scorer.calls


@pytest.mark.parametrize("content_type,named", [("text/plain", "'text/plain'"), (None, "none"),
                                                ("application/x-www-form-urlencoded",
                                                 "'application/x-www-form-urlencoded'")])
async def test_wrong_content_type_names_the_expected_one(client: httpx.AsyncClient, scorer: FormulaScorer,
                                                         content_type: str | None, named: str):
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/v1/score", content=b'{"user_id": "u1", "candidates": [1]}', headers=headers)
    error = assert_error(response, 422, "invalid_request")
    assert error["details"] == [{"loc": "body", "type": "unsupported_content_type",
                                 "message": f"expected Content-Type application/json, got {named}"}]
    assert not scorer.calls


async def test_json_suffix_media_types_are_json(client: httpx.AsyncClient):
    response = await client.post("/v1/score", content=b'{"user_id": "u1", "candidates": [1]}',
                                 headers={"content-type": "application/vnd.reclora+json; charset=utf-8"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("depth", [33, 990, 1000, 100_000])
async def test_too_deeply_nested_json_is_422_naming_the_limit(client: httpx.AsyncClient, scorer: FormulaScorer,
                                                              depth: int):
    raw = b'{"user_id": "u1", "candidates": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    response = await client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert error["details"] == [{"loc": "body", "type": "json_too_deep",
                                 "message": f"JSON nested {depth} levels deep; at most 32 allowed"}]
    assert not scorer.calls


async def test_nesting_at_the_limit_and_brackets_in_strings_are_not_too_deep(client: httpx.AsyncClient):
    at_limit = b'{"user_id": "u1", "candidates": ' + b"[" * 31 + b"]" * 31 + b"}"
    response = await client.post("/v1/score", content=at_limit, headers={"content-type": "application/json"})
    assert assert_error(response, 422)["details"][0]["loc"] == "candidates[0]"  # parsed, then validated
    in_string = {"user_id": "[{" * 2000, "candidates": [1]}
    assert assert_error(await client.post("/v1/score", json=in_string), 422)["details"][0]["loc"] == "user_id"


async def test_streamed_deep_json_is_422(client: httpx.AsyncClient):
    async def chunks():  # no Content-Length: nesting is counted over the whole body once read
        yield b'{"user_id": "u1", "candidates": '
        for _ in range(10):
            yield b"[" * 10
        for _ in range(10):
            yield b"]" * 10
        yield b"}"

    response = await client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert assert_error(response, 422)["details"][0]["type"] == "json_too_deep"


@pytest.mark.parametrize("user_id,stored", [(196, "196"), (0, "0"), (-5, "-5"), (INT64_MAX, str(INT64_MAX))])
async def test_integer_user_ids_are_their_decimal_string(client: httpx.AsyncClient, scorer: FormulaScorer, app,
                                                         user_id: int, stored: str):
    response = await client.post("/v1/score", json=score_body(user_id=user_id))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == stored and scorer.calls[-1]["user_id"] == stored
    appended = await client.post("/v1/events", json=events_body(event(), user_id=user_id))
    assert appended.status_code == 200, appended.text
    history: HistoryStore = app.state.history
    assert (await history.read(stored)).items.tolist() == [5]  # the same user as the string id


async def test_oversized_body_is_413(client: httpx.AsyncClient):
    raw = b'{"user_id": "u1", "candidates": [' + b"1, " * 400_000 + b"1]}"
    assert_error(await client.post("/v1/score", content=raw, headers={"content-type": "application/json"}), 413,
                 "content_too_large")


async def test_oversized_streamed_body_is_413(client: httpx.AsyncClient):
    async def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"user_id": "u1", "candidates": ['
        for _ in range(20):
            yield b"1, " * 20_000
        yield b"1]}"

    response = await client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "content_too_large")


# Events: (case id, event overrides or whole body, expected loc, message substring)
EVENT_CASES = [
    ("rating above range", events_body(event(rating=5.5)), "events[0].rating", "outside [0.5, 5.0]"),
    ("rating below range", events_body(event(rating=0.0)), "events[0].rating", "outside"),
    ("rating as string", events_body(event(rating="4")), "events[0].rating", "valid number"),
    ("rating null", events_body(event(rating=None)), "events[0].rating", "valid number"),
    ("timestamp zero", events_body(event(timestamp=0)), "events[0].timestamp", "greater than 0"),
    ("timestamp negative", events_body(event(timestamp=-1)), "events[0].timestamp", "greater than 0"),
    ("timestamp in milliseconds", events_body(event(timestamp=NOW * 1000)), "events[0].timestamp", "in the future"),
    ("timestamp beyond int64", events_body(event(timestamp=2**64)), "events[0].timestamp", "less than or equal"),
    ("timestamp as float", events_body(event(timestamp=1.5e9)), "events[0].timestamp", "valid integer"),
    ("timestamp as string", events_body(event(timestamp="2024-01-01")), "events[0].timestamp", "valid integer"),
    ("item unknown", events_body(event(), event(item_id=999)), "events[1].item_id", "unknown item 999"),
    ("item negative", events_body(event(item_id=-3)), "events[0].item_id", "greater than or equal to 0"),
    ("item beyond int64", events_body(event(item_id=INT64_MAX + 1)), "events[0].item_id", "less than or equal"),
    ("item missing", events_body({"rating": 4.0, "timestamp": NOW}), "events[0].item_id", "Field required"),
    ("out of order in batch", events_body(event(timestamp=NOW - 10), event(timestamp=NOW - 20)),
     "events[1].timestamp", "earlier than the previous"),
    ("no events", {"user_id": "u1", "events": []}, "events", "at least 1"),
    ("too many events", {"user_id": "u1", "events": [event(timestamp=NOW - 1000 + i) for i in range(101)]},
     "events", "at most 100"),
    ("bad user id", events_body(event(), user_id="x}y"), "user_id", "pattern"),
    ("unknown event field", events_body(event(extra=1)), "events[0].extra", "Extra inputs"),
]


@pytest.mark.parametrize("body,loc,message", [c[1:] for c in EVENT_CASES], ids=[c[0] for c in EVENT_CASES])
async def test_bad_events_are_422_and_nothing_is_written(client: httpx.AsyncClient, app, body, loc, message):
    error = assert_error(await client.post("/v1/events", json=body), 422)
    matching = [d for d in error["details"] if d["loc"] == loc]
    assert matching and any(message in d["message"] for d in matching), error
    history: HistoryStore = app.state.history
    assert not (await history.read("u1")).exists


@pytest.mark.parametrize("rating", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_non_finite_rating_is_422(client: httpx.AsyncClient, rating: str):
    raw = f'{{"user_id": "u1", "events": [{{"item_id": 5, "rating": {rating}, "timestamp": {NOW}}}]}}'.encode()
    error = assert_error(await client.post("/v1/events", content=raw, headers={"content-type": "application/json"}),
                         422)
    assert error["details"][0]["loc"] == "events[0].rating" and "finite" in error["message"]


PROFILE_CASES = [
    ("value not a string", {"profile": {"age": 24}}, "profile.age", "valid string"),
    ("value too long", {"profile": {"occupation": "x" * 257}}, "profile.occupation", "at most 256"),
    ("bad key", {"profile": {"bad key": "x"}}, "profile.bad key.[key]", "pattern"),
    ("too many fields", {"profile": {f"f{i}": "x" for i in range(65)}}, "profile", "at most 64"),
    ("profile not an object", {"profile": ["age", "24"]}, "profile", "valid dictionary"),
    ("missing profile", {}, "profile", "Field required"),
]


@pytest.mark.parametrize("body,loc,message", [c[1:] for c in PROFILE_CASES], ids=[c[0] for c in PROFILE_CASES])
async def test_bad_profile_is_422(client: httpx.AsyncClient, body, loc, message):
    error = assert_error(await client.put("/v1/users/u1/profile", json=body), 422)
    matching = [d for d in error["details"] if d["loc"] == loc]
    assert matching and any(message in d["message"] for d in matching), error


@pytest.mark.parametrize("user_id", ["a%7Bb%7D", "x" * 129, "a%20b"])
async def test_bad_profile_user_id_in_path_is_422(client: httpx.AsyncClient, user_id: str):
    error = assert_error(await client.put(f"/v1/users/{user_id}/profile", json={"profile": {}}), 422)
    assert error["details"][0]["loc"] == "path.user_id"
