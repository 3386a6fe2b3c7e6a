"""Log lines are JSON objects carrying the request id and ``extra`` fields (service.logging)."""

from __future__ import annotations

import json
import logging

from service.logging import JsonFormatter, RequestIdFilter, TextFormatter, request_id_var


def _record(msg: str = "hello %s", args=("world",), **extra) -> logging.LogRecord:
    record = logging.getLogger("t").makeRecord("t", logging.INFO, __file__, 1, msg, args, None, extra=extra)
    RequestIdFilter().filter(record)
    return record


def test_json_line_has_request_id_and_extras():
    token = request_id_var.set("req-5")
    try:
        line = JsonFormatter().format(_record(route="/v1/score", status=200))
    finally:
        request_id_var.reset(token)
    entry = json.loads(line)
    assert entry["message"] == "hello world" and entry["level"] == "INFO" and entry["logger"] == "t"
    assert entry["request_id"] == "req-5" and entry["route"] == "/v1/score" and entry["status"] == 200
    assert entry["ts"].endswith("+00:00")


def test_exceptions_are_one_json_line():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys
        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    RequestIdFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["request_id"] is None and "ValueError: bad" in entry["exc"]


def test_text_format_for_local_runs():
    line = TextFormatter().format(_record(route="/livez"))
    assert "hello world" in line and "route=/livez" in line
