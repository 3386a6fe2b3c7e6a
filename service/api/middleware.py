"""Request middleware: request id, latency metric, access log, last-resort 500, body size limit.

Pure ASGI (no ``BaseHTTPMiddleware``) so the request-id context variable is visible to the
route and its handlers, and so an unexpected exception is answered here, inside the request-id
scope, in the error schema and with the ``X-Request-ID`` header, instead of by Starlette's
plain-text fallback. The body limit is ours rather than FastAPI's ``max_body_size`` for the
same reason: its 413 is plain text.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response, internal_error_response
from service.logging import request_id_var
from service.metrics import Metrics

log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
UNMATCHED_ROUTE = "unmatched"  # one label for every unknown path: no cardinality from scanners
QUIET_ROUTES = frozenset({"/livez", "/readyz", "/metrics"})  # probes: access-logged at DEBUG only


def request_id_from(headers: Headers) -> str:
    """The caller's id when it is a sane token (so it is safe in logs and headers), else a new one."""
    given = headers.get(REQUEST_ID_HEADER)
    return given if given is not None and _SANE_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope))
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id, "method": scope["method"],
                                                    "route": _route(scope)})
            if started:
                raise  # the response is half sent; the server can only drop the connection
            await internal_error_response()(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = _route(scope)
            self.metrics.observe_request(scope["method"], route, status, elapsed)
            fields = {"request_id": request_id, "method": scope["method"], "route": route, "status": status,
                      "duration_ms": round(elapsed * 1000.0, 3)}
            if route == UNMATCHED_ROUTE:
                fields["path"] = scope["path"][:200]
            log.log(logging.DEBUG if route in QUIET_ROUTES else logging.INFO, "request", extra=fields)
            request_id_var.reset(token)


def _route(scope: Scope) -> str:
    """The matched route's template (e.g. '/v1/users/{user_id}/profile'), never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413: up front by Content-Length, else while
    streaming (the route's body reader turns the raised HTTPException into the error schema).

    ``limits`` gives other caps by path prefix (model uploads are large and capped by their own
    setting); the longest matching prefix wins."""

    def __init__(self, app: ASGIApp, max_bytes: int, limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = sorted((limits or {}).items(), key=lambda kv: -len(kv[0]))

    def _limit(self, path: str) -> int:
        return next((cap for prefix, cap in self.limits if path.startswith(prefix)), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope.get("path", ""))
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, self._message(limit))
            return message

        await self.app(scope, receive_limited, send)

    @staticmethod
    def _message(limit: int) -> str:
        return f"request body larger than {limit} bytes"

    def _too_large(self, limit: int) -> ASGIApp:
        return error_response(413, "content_too_large", self._message(limit))
