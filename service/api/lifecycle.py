"""Startup and shutdown of the app's services (the FastAPI lifespan).

The history store is built at startup; the model loads in the background (it takes seconds to
minutes) so ``/livez`` and ``/readyz`` answer meanwhile and readiness tells the truth. Services
passed into ``build_app`` belong to the caller and are not closed here.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from service.api.score.serving import Scorer
from service.config import Settings
from service.history import HistorySettings, HistoryStore

log = logging.getLogger(__name__)

FACTORY_MODULE = "service.runtime.factory"


@dataclass
class Lifecycle:
    """What readiness needs beyond the services themselves."""

    draining: bool = False
    model_error: str | None = None
    owned: set[str] = field(default_factory=set)  # app.state attributes built (and closed) by the lifespan

    def begin_drain(self) -> None:
        """Report not-ready from now on (SIGTERM): load balancers stop routing new requests here."""
        if not self.draining:
            log.info("draining: readiness now reports 503")
        self.draining = True


def history_settings(settings: Settings) -> HistorySettings:
    return HistorySettings(prefix=settings.redis_prefix, max_events=settings.history_max_events,
                           socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s,
                           max_connections=settings.redis_max_connections)


def import_scorer_factory() -> Callable[..., Scorer]:
    """``service.runtime.factory.build_scorer``, imported only when the app has to build a model."""
    try:
        module = importlib.import_module(FACTORY_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != FACTORY_MODULE:
            raise
        raise RuntimeError(f"{FACTORY_MODULE} is missing: this installation has no model runtime; "
                           "pass a scorer to build_app()") from exc
    factory = getattr(module, "build_scorer", None)
    if not callable(factory):
        raise RuntimeError(f"{FACTORY_MODULE} defines no build_scorer(settings, metrics, history=...)")
    return factory


async def load_scorer(app: FastAPI) -> None:
    """Build the scorer in a worker thread and publish it; a failure is logged and kept for /readyz."""
    state = app.state
    try:
        factory = import_scorer_factory()
        scorer = await asyncio.to_thread(factory, state.settings, state.metrics, history=state.history)
    except Exception as exc:
        log.exception("model load failed; the service stays not ready")
        state.lifecycle.model_error = f"{type(exc).__name__}: {exc}"
        return
    state.lifecycle.owned.add("scorer")
    settings = state.settings
    # The registry manages the runtime's pipeline (its model holder); another scorer has no versions.
    manageable = hasattr(scorer, "holder")
    if manageable and (settings.admin_enabled or settings.follows_store):
        try:
            from service.registry.manager import build_manager

            state.models = await asyncio.to_thread(build_manager, settings, state.metrics, scorer)
        except Exception as exc:
            log.exception("model registry failed to start; the service stays not ready")
            state.lifecycle.model_error = f"model registry: {type(exc).__name__}: {exc}"
            scorer.close()
            return
    state.scorer = scorer
    state.metrics.set_model_version(scorer.model_version)
    log.info("model loaded", extra={"model_version": scorer.model_version})


async def follow_store(app: FastAPI) -> None:
    """Every ``model_poll_s``, serve the version the store's ACTIVE pointer names (set by any gateway
    sharing the store); runs until shutdown."""
    state = app.state
    while True:
        await asyncio.sleep(state.settings.model_poll_s)
        if state.models is None:
            continue
        try:
            await asyncio.to_thread(state.models.follow_pointer)
        except Exception:
            log.exception("following the store's ACTIVE pointer failed; will retry")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    lifecycle: Lifecycle = state.lifecycle
    if state.history is None:
        state.history = HistoryStore.from_url(state.settings.redis_url, history_settings(state.settings))
        lifecycle.owned.add("history")
    loader = None
    if state.scorer is None:
        loader = asyncio.create_task(load_scorer(app), name="load-scorer")
    else:
        state.metrics.set_model_version(state.scorer.model_version)
    follower = None
    if state.settings.follows_store:
        follower = asyncio.create_task(follow_store(app), name="follow-store")
    try:
        yield
    finally:
        lifecycle.begin_drain()
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        if loader is not None and not loader.done():
            loader.cancel()  # the loading thread finishes on its own; its result is dropped
            await asyncio.gather(loader, return_exceptions=True)
        if "scorer" in lifecycle.owned:
            state.scorer.close()
        if "history" in lifecycle.owned:
            await state.history.aclose()
        log.info("stopped")
