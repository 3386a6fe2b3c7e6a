"""Assertions on the service's HTTP answers, shared by the API and end-to-end tests."""

from __future__ import annotations

import httpx


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """``response`` is ``status`` in the service's one error schema; returns its ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details", "request_id"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    for detail in error["details"]:
        assert set(detail) == {"loc", "message", "type"}, detail
    if code is not None:
        assert error["code"] == code, error
    return error
