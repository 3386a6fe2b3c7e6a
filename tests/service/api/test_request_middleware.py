"""Request ids, the last-resort 500, unknown routes, and the access log."""

from __future__ import annotations

import logging

import httpx
import pytest
from tests.service.api.api_support import FormulaScorer, assert_error

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("given", ["abc-123", "0f1e2d3c4b5a", "trace:42.7_x"])
async def test_sane_request_id_is_echoed(client: httpx.AsyncClient, given: str):
    response = await client.get("/livez", headers={"X-Request-ID": given})
    assert response.headers["x-request-id"] == given


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 129, "<script>", "a\tb"])
async def test_missing_or_odd_request_id_is_replaced(client: httpx.AsyncClient, given: str | None):
    headers = {} if given is None else {"X-Request-ID": given}
    response = await client.get("/livez", headers=headers)
    generated = response.headers["x-request-id"]
    assert generated != given and len(generated) == 32 and int(generated, 16) >= 0


async def test_error_bodies_carry_the_request_id(client: httpx.AsyncClient):
    response = await client.post("/v1/score", json={}, headers={"X-Request-ID": "req-9"})
    assert assert_error(response, 422)["request_id"] == "req-9"


async def test_unexpected_exception_is_500_in_the_schema_without_internals(
        client: httpx.AsyncClient, scorer: FormulaScorer, caplog: pytest.LogCaptureFixture):
    scorer.fail = True
    with caplog.at_level(logging.ERROR):
        response = await client.post("/v1/score", json={"user_id": "u1", "candidates": [1]},
                                     headers={"X-Request-ID": "boom-1"})
    error = assert_error(response, 500, "internal_error")
    assert error["request_id"] == "boom-1"
    assert "exploded" not in response.text and "RuntimeError" not in response.text
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged and logged[0].exc_info and "exploded" in str(logged[0].exc_info[1])
    assert logged[0].request_id == "boom-1"


async def test_unknown_path_and_method_use_the_schema(client: httpx.AsyncClient):
    assert_error(await client.get("/v1/nope"), 404, "not_found")
    assert_error(await client.get("/v1/score"), 405, "method_not_allowed")


async def test_access_log_has_route_template_not_user_id(client: httpx.AsyncClient,
                                                         caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="service.access"):
        await client.put("/v1/users/private-user-77/profile", json={"profile": {}}, headers={"X-Request-ID": "r-1"})
    [record] = [r for r in caplog.records if r.name == "service.access"]
    assert (record.method, record.route, record.status) == ("PUT", "/v1/users/{user_id}/profile", 200)
    assert record.request_id == "r-1" and record.duration_ms >= 0
    assert "private-user-77" not in record.getMessage() and not hasattr(record, "path")


async def test_probes_are_access_logged_at_debug(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="service.access"):
        await client.get("/readyz")
    assert not [r for r in caplog.records if r.name == "service.access"]
