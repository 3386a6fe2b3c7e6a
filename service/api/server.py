"""Run the app under uvicorn with a drain window on SIGTERM.

On the first SIGTERM/SIGINT readiness flips to 503 at once, requests keep being served for
``shutdown_delay_s`` (load balancers see the 503 and stop routing here), then uvicorn stops
accepting connections, finishes in-flight requests within ``graceful_timeout_s`` and runs the
lifespan shutdown. A second signal skips the rest of the window.
"""

from __future__ import annotations

import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.wiring import create_app
from service.config import Settings, get_settings
from service.logging import configure_logging


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a readiness drain window before the usual graceful shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, delay_s: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.delay_s = delay_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.fastapi_app.state.lifecycle.begin_drain()
        if self._drain_timer is None and self.delay_s > 0:
            self._drain_timer = threading.Timer(self.delay_s, super().handle_exit, args=(sig, frame))
            self._drain_timer.daemon = True
            self._drain_timer.start()
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()  # a second signal skips the rest of the window
        super().handle_exit(sig, frame)


def make_server(settings: Settings, app: FastAPI | None = None) -> DrainingServer:
    app = app or create_app(settings)
    http = settings.http
    config = uvicorn.Config(app, host=http.host, port=http.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=http.graceful_timeout_s, lifespan="on")
    return DrainingServer(config, app, http.shutdown_delay_s)


def main() -> None:
    settings = get_settings()
    configure_logging(settings.logging.log_level, settings.logging.log_json)
    make_server(settings).run()


__all__ = ["DrainingServer", "main", "make_server"]
