"""Request middleware: request id, latency metric, access log, last-resort 500, body limits.

Pure ASGI (no ``BaseHTTPMiddleware``) so the request-id context variable is visible to the
route and its handlers, and so an unexpected exception is answered here, inside the request-id
scope, in the error schema and with the ``X-Request-ID`` header, instead of by Starlette's
plain-text fallback. The body limit is ours rather than FastAPI's ``max_body_size`` for the
same reason: its 413 is plain text. The same reader caps how deeply a JSON body nests: the
parser's own limit is the interpreter's recursion limit, which fails as an opaque 400.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

import numpy as np
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import MalformedBody, error_response, internal_error_response, is_json_media_type
from service.logging import request_id_var
from service.metrics import Metrics

log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SHED_ROUTE_KEY = "reclora.shed_route"  # the template of a request shed before routing (set by admission)
UNMATCHED_ROUTE = "unmatched"  # one label for every unknown path: no cardinality from scanners
QUIET_ROUTES = frozenset({"/livez", "/readyz", "/metrics"})  # probes: access-logged at DEBUG only
MAX_JSON_DEPTH = 32  # the deepest request body of this API nests 3 levels
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def request_id_from(headers: Headers) -> str:
    """The caller's id when it is a sane token (so it is safe in logs and headers), else a new one."""
    given = headers.get(REQUEST_ID_HEADER)
    return given if given is not None and _SANE_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    """``fixed_routes``: paths served without a route template (the OpenAPI document, the docs'
    static files), labelled as themselves in metrics and logs; a fixed set, so still bounded."""

    def __init__(self, app: ASGIApp, metrics: Metrics, fixed_routes: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.fixed_routes = fixed_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope))
        path = _app_path(scope)  # before routing: a mount rewrites root_path
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
                                                    "route": self._route(scope, path)})
            if started:
                raise  # the response is half sent; the server can only drop the connection
            await internal_error_response()(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = self._route(scope, path)
            self.metrics.observe_request(scope["method"], route, status, elapsed)
            fields = {"request_id": request_id, "method": scope["method"], "route": route, "status": status,
                      "duration_ms": round(elapsed * 1000.0, 3)}
            if route == UNMATCHED_ROUTE:
                fields["path"] = scope["path"][:200]
            log.log(logging.DEBUG if route in QUIET_ROUTES else logging.INFO, "request", extra=fields)
            request_id_var.reset(token)

    def _route(self, scope: Scope, path: str) -> str:
        """The matched route's template (e.g. '/v1/users/{user_id}/profile'), else ``path`` when it
        is one of the fixed routes; never another raw path."""
        template = getattr(scope.get("route"), "path", None) or scope.get(SHED_ROUTE_KEY)
        if template:
            return template
        return path if path in self.fixed_routes else UNMATCHED_ROUTE


def _app_path(scope: Scope) -> str:
    """The request path within this app (without the server's root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, brackets inside strings not counted; 0 when
    a string is left open (the parser reports that body as invalid)."""
    structure = _JSON_STRING.sub(b"", body)
    if b'"' in structure:
        return 0
    codes = np.frombuffer(structure, dtype=np.uint8)
    steps = ((codes == ord("[")) | (codes == ord("{"))).astype(np.int32) - ((codes == ord("]")) | (codes == ord("}")))
    return int(np.cumsum(steps).max(initial=0))


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413: up front by Content-Length, else while
    streaming (the route's body reader turns the raised HTTPException into the error schema).
    JSON bodies nested deeper than ``max_json_depth`` get a 422 once read: nesting is counted only
    when the body has more opening brackets than that, so a usual body costs two ``bytes.count``.

    ``limits`` gives other caps by path prefix (model uploads are large and capped by their own
    setting); the longest matching prefix wins."""

    def __init__(self, app: ASGIApp, max_bytes: int, limits: dict[str, int] | None = None,
                 max_json_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = sorted((limits or {}).items(), key=lambda kv: -len(kv[0]))
        self.max_json_depth = max_json_depth

    def _limit(self, path: str) -> int:
        return next((cap for prefix, cap in self.limits if path.startswith(prefix)), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope.get("path", ""))
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(limit)(scope, receive, send)
            return
        json_body = is_json_media_type(headers.get("content-type"))
        seen = opened = 0
        chunks: list[bytes] = []

        async def receive_limited() -> Message:
            nonlocal seen, opened
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > limit:
                    raise HTTPException(413, self._message(limit))
                if json_body:
                    chunks.append(chunk)
                    opened += chunk.count(b"[") + chunk.count(b"{")
                    if not message.get("more_body", False) and opened > self.max_json_depth:
                        self._check_depth(b"".join(chunks))
            return message

        await self.app(scope, receive_limited, send)

    def _check_depth(self, body: bytes) -> None:
        depth = json_depth(body)
        if depth > self.max_json_depth:
            raise MalformedBody(f"JSON nested {depth} levels deep; at most {self.max_json_depth} allowed",
                                "json_too_deep")

    @staticmethod
    def _message(limit: int) -> str:
        return f"request body larger than {limit} bytes"

    def _too_large(self, limit: int) -> ASGIApp:
        return error_response(413, "content_too_large", self._message(limit))
