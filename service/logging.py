"""Structured logs: stdlib ``logging`` with one JSON object per line, tagged with the request id.

The request id travels in a ``ContextVar`` set by the HTTP middleware, so any logger on the
request path (history store, scoring pipeline) is correlated without passing ids around.
Fields given as ``extra={...}`` become top-level JSON keys.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class RequestIdFilter(logging.Filter):
    """Stamp each record with the current request id (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs; extras are appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={v}" for k, v in vars(record).items()
                  if k not in _RESERVED and k != "request_id" and not k.startswith("_")]
        return f"{line} {' '.join(extras)}" if extras else line


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Route the root logger (and uvicorn's) to stderr in the chosen format.

    uvicorn's own access log is silenced: the request middleware writes a structured one.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True


class BurstLog:
    """One log line per burst of the same failure: the first occurrence is logged (with its
    traceback when ``exc_info``), repeats within ``interval_s`` are counted, and the next line
    after the interval says how many were suppressed. A failing backend then writes a line every
    few seconds instead of one per request; the metrics carry the per-request counts.

    Written here rather than with a logging filter: the count of what was suppressed belongs in
    the next line, which a filter that drops records cannot write."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, message: str, *, exc_info: bool = False, **extra: object) -> bool:
        """Log ``message`` unless ``key`` was logged within the interval; returns whether it logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, float("-inf")) < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message = f"{message} ({suppressed} more since the last report, not logged)"
        self.logger.log(level, message, exc_info=exc_info, extra={"suppressed": suppressed, **extra})
        return True
