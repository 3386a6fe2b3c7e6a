"""A gateway with the embedded engine leaves the CPUs to the engine's threads first: its event loop
thread, and the CRM's and the text side's threads it starts, take a higher nice value; the engine's
thread keeps the process's."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from tests.e2e.e2e_support import LiveServer, World

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def nice_of(thread: threading.Thread) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


def test_the_event_loop_and_its_workers_yield_the_cpus_to_the_engine(world: World) -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    others = set(threading.enumerate())  # other gateways' threads of this test session
    server = LiveServer.start(world.settings(gateway_threads_nice=7))
    try:
        with server.client() as http:  # a request starts the CRM's and the text side's threads
            response = http.post("/v1/score", json={"user_id": world.users[0], "candidates": [1, 2, 3]})
        assert response.status_code == 200, response.text
        mine = [t for t in threading.enumerate() if t not in others and t.is_alive()]
        engines = [t for t in mine if t.name == "engine"]
        assert nice_of(server.thread) == min(19, base + 7)
        workers = [t for t in mine if t.name.startswith(("crm", "text"))]
        assert workers and all(nice_of(t) == min(19, base + 7) for t in workers)
        assert engines and all(nice_of(t) == base for t in engines)
    finally:
        server.stop()
