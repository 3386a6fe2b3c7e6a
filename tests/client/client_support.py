"""Real servers on loopback for the client tests: the gateway (with ``FormulaScorer``, real Redis)
and small scripted apps for answers the gateway cannot be made to give on demand (429, slow
answers, a proxy's HTML), each under uvicorn in a thread on a pre-bound 127.0.0.1 socket.

Imported by ``conftest.py`` and the tests (pytest puts this directory on ``sys.path``)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

sys.path.append(str(Path(__file__).resolve().parents[1] / "service" / "api"))  # api_support (FormulaScorer)
from tests.service.api.api_support import REDIS_URL, FormulaScorer  # noqa: E402
from tests.http_support import closed_port, wait_for  # noqa: E402,F401  (closed_port re-exported)

from service.api.server import make_server  # noqa: E402
from service.config import Settings  # noqa: E402

REQUEST_COUNT = "reclora_http_request_duration_seconds_count"


@contextmanager
def serve(server: uvicorn.Server) -> Iterator[str]:
    """Run ``server`` in a thread on an ephemeral loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="client-uvicorn")
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 15.0, "uvicorn start", interval=0.01)
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop within 15 s")


@dataclass
class Gateway:
    url: str
    app: FastAPI
    scorer: FormulaScorer | None = None

    def requests(self, method: str, route: str, status: int) -> int:
        """Requests the gateway answered on ``route`` with ``status`` (its own latency metric)."""
        value = self.app.state.metrics.registry.get_sample_value(
            REQUEST_COUNT, {"method": method, "route": route, "status": str(status)})
        return int(value or 0)

    def settled_requests(self, method: str, route: str, status: int, at_least: int = 1) -> int:
        """``requests`` once the metric shows ``at_least``: the middleware records a request just
        after its answer is sent, so a client can see the answer first."""
        wait_for(lambda: self.requests(method, route, status) >= at_least, 5.0, f"{method} {route} {status}",
                 interval=0.01)
        return self.requests(method, route, status)


@contextmanager
def running_gateway(settings: Settings, app: FastAPI, scorer: FormulaScorer | None = None) -> Iterator[Gateway]:
    with serve(make_server(settings, app)) as url:
        if scorer is not None:
            scorer.history = app.state.history  # built by the lifespan: reports cold_start truthfully
        yield Gateway(url, app, scorer)


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Scripted:
    """A server answering each ``"METHOD /path"`` with its script's answers in turn (the last repeats)."""

    url: str
    hits: Counter[str]


@contextmanager
def scripted(script: dict[str, list[Answer]]) -> Iterator[Scripted]:
    hits: Counter[str] = Counter()
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
    async def answer(path: str, request: Request) -> Response:
        key = f"{request.method} /{path}"
        hits[key] += 1
        answers = script[key]
        planned = answers[min(hits[key], len(answers)) - 1]
        if planned.delay_s:
            await asyncio.sleep(planned.delay_s)
        if isinstance(planned.body, str):
            return Response(planned.body, status_code=planned.status, headers=planned.headers, media_type="text/html")
        return JSONResponse(planned.body, status_code=planned.status, headers=planned.headers)

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=3)
    with serve(uvicorn.Server(config)) as url:
        yield Scripted(url, hits)
