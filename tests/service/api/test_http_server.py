"""The service over real HTTP: uvicorn on a loopback port, in a thread and as ``python -m service.api``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.service.api.api_support import FormulaScorer, assert_error

from service.api import build_app
from service.api.server import DrainingServer, make_server
from service.config import Settings

REPO = Path(__file__).resolve().parents[3]


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[tuple[DrainingServer, str, threading.Thread]]:
    """The app under uvicorn in a background thread, on a pre-bound loopback socket."""
    settings = settings.replace(shutdown_delay_s=0.5, graceful_timeout_s=5.0)
    sock = _loopback_socket()
    scorer = FormulaScorer()
    app = build_app(settings, scorer=scorer)
    server = make_server(settings, app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait(lambda: server.started)
    scorer.history = app.state.history  # built by the lifespan, inside the server's event loop
    host, port = sock.getsockname()
    yield server, f"http://{host}:{port}", thread
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_scores_and_errors_over_real_http(live_server):
    _, url, _ = live_server
    with httpx.Client(base_url=url, timeout=5) as http:
        response = http.post("/v1/score", json={"user_id": "u1", "candidates": [5, 6]}, headers={"X-Request-ID": "h-1"})
        assert response.status_code == 200 and response.headers["x-request-id"] == "h-1"
        assert [s["item_id"] for s in response.json()["scores"]] == [5, 6]

        bad = http.post("/v1/score", content=b'{"user_id": "u1", "candidates": [1,,]}',
                        headers={"content-type": "application/json"})
        assert_error(bad, 422, "invalid_request")
        huge = http.post("/v1/score", content=b'{"user_id": "u1", "candidates": [99999999999999999999]}',
                         headers={"content-type": "application/json"})
        assert assert_error(huge, 422)["details"][0]["loc"] == "candidates[0]"

        appended = http.post("/v1/events", json={"user_id": "u1", "events": [
            {"item_id": 5, "rating": 4.0, "timestamp": 1_700_000_000}]})
        assert appended.status_code == 200, appended.text
        assert http.post("/v1/score", json={"user_id": "u1", "candidates": [5]}).json()["cold_start"] is False
        assert http.get("/readyz").status_code == 200
        assert "reclora_http_request_duration_seconds_bucket" in http.get("/metrics").text


def test_sigterm_drains_then_stops(live_server):
    server, url, thread = live_server
    with httpx.Client(base_url=url, timeout=5) as http:
        assert http.get("/readyz").status_code == 200
        server.handle_exit(signal.SIGTERM, None)
        error = assert_error(http.get("/readyz"), 503, "not_ready")
        assert "shutting down" in error["message"]
        # the drain window still serves traffic
        assert http.post("/v1/score", json={"user_id": "u1", "candidates": [1]}).status_code == 200
    thread.join(10)
    assert not thread.is_alive()


def test_module_entry_point_serves_and_stops_on_sigterm(redis_prefix: str, tmp_path: Path):
    sock = _loopback_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "RECLORA_PORT": str(port), "RECLORA_REDIS_PREFIX": redis_prefix,
           "RECLORA_MODEL_STORE": str(tmp_path), "RECLORA_LOG_JSON": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "service.api"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            def alive() -> bool:
                try:
                    return http.get("/livez").status_code == 200
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stderr.read()
                    return False
            _wait(alive, timeout=60)
            error = assert_error(http.get("/readyz"), 503, "not_ready")  # no model in an empty store
            assert any(d["loc"] == "model" for d in error["details"])
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines and all("level" in entry and "message" in entry for entry in lines)
    assert any(entry["message"] == "stopped" for entry in lines)
