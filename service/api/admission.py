"""Bounded concurrency per route: past its bound a request is answered 429 with Retry-After at
once, before its body is read, instead of queueing inside the process.

Shedding is the healthy answer to overload: the requests admitted keep their latency, the ones
refused learn within milliseconds to retry (or go to another replica), and readiness stays true.
A pure ASGI middleware, so a shed request costs no body parsing, routing or validation.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import error_response
from service.api.middleware import SHED_ROUTE_KEY
from service.config import RequestSettings
from service.metrics import Metrics


@dataclass
class InflightLimit:
    """Requests in flight on one route family, at most ``limit``; touched on the event loop only."""

    route: str  # the metrics label
    limit: int
    current: int = 0

    def try_enter(self) -> bool:
        if self.current >= self.limit:
            return False
        self.current += 1
        return True

    def leave(self) -> None:
        self.current -= 1


class LoadShedMiddleware:
    """Score requests bounded by ``score_inflight_limit``, event and profile writes by
    ``events_inflight_limit``; a shed answer says retry after ``shed_retry_after_s``."""

    def __init__(self, app: ASGIApp, *, settings: RequestSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.score = InflightLimit("/v1/score", settings.score_inflight_limit)
        self.writes = InflightLimit("/v1/events", settings.events_inflight_limit)

    def _limit(self, scope: Scope) -> tuple[InflightLimit, str] | None:
        """The bound this request counts against, and its route template (for the metrics)."""
        path, method = scope["path"], scope["method"]
        if path == "/v1/score" and method == "POST":
            return self.score, path
        if path == "/v1/events" and method == "POST":
            return self.writes, path
        if method == "PUT" and path.startswith("/v1/users/") and path.endswith("/profile"):
            return self.writes, "/v1/users/{user_id}/profile"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        bound = self._limit(scope) if scope["type"] == "http" else None
        if bound is None:
            await self.app(scope, receive, send)
            return
        limit, template = bound
        if not limit.try_enter():
            scope[SHED_ROUTE_KEY] = template  # never routed: the access log and metrics still name the route
            self.metrics.shed.labels(limit.route).inc()
            retry_after_s = self.settings.shed_retry_after_s
            response = error_response(429, "overloaded", f"{limit.limit} requests in flight on {limit.route}, "
                                      f"the most this gateway takes; retry after {retry_after_s} s",
                                      headers={"Retry-After": str(retry_after_s)})
            await response(scope, receive, send)
            return
        gauge = self.metrics.inflight.labels(limit.route)
        gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            limit.leave()
            gauge.dec()
