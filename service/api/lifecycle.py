"""Startup and shutdown of the app's services (the FastAPI lifespan).

The history store is built at startup; the runtime (model, engine, registry) is built in the
background by the ``RuntimeFactory`` the app was given (it takes seconds to minutes), so
``/livez`` and ``/readyz`` answer meanwhile and readiness tells the truth. Services passed into
``build_app`` belong to the caller and are not closed here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI

from service.config import Settings
from service.history import HistoryStore
from service.metrics import Metrics
from service.scoring.contracts import Explainer, KnowledgeRefresh, OnlineEvaluation, Scorer
from service.tasks import raise_if_cancelled, stop_tasks
from service.thread_priority import lower_thread_priority

if TYPE_CHECKING:  # the registry loads models (torch); the app imports without building one
    from service.registry.manager import ModelManager

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the app serves with, as the wiring built it: the scorer, the model registry (None when
    this gateway neither administers nor follows the store), the remote LLM replicas' health
    (None for an embedded engine), the online evaluation of served scores (None without the
    served-score log), the nearline refresh of users' knowledge vectors (None when off), and the
    explainer of /v1/explain (None when off); ``threads_nice``: the nice increment the event loop
    thread takes once the engine's thread runs (``TorchSettings.gateway_threads_nice``)."""

    scorer: Scorer
    models: "ModelManager | None" = None
    replica_health: Callable[[], dict[str, bool]] | None = None
    online: OnlineEvaluation | None = None
    knowledge: KnowledgeRefresh | None = None
    explainer: Explainer | None = None
    threads_nice: int = 0


RuntimeFactory = Callable[[Settings, Metrics, HistoryStore], Runtime]


@dataclass
class Lifecycle:
    """What readiness needs beyond the services themselves."""

    draining: bool = False
    model_error: str | None = None
    owned: set[str] = field(default_factory=set)  # app.state attributes built (and closed) by the lifespan
    tasks: list[asyncio.Task] = field(default_factory=list)  # the runtime's background loops, cancelled at shutdown

    def begin_drain(self) -> None:
        """Report not-ready from now on (SIGTERM): load balancers stop routing new requests here."""
        if not self.draining:
            log.info("draining: readiness now reports 503")
        self.draining = True


async def load_runtime(app: FastAPI, factory: RuntimeFactory) -> None:
    """Build the runtime in a worker thread and publish it; a failure is logged and kept for /readyz."""
    state = app.state
    try:
        runtime = await asyncio.to_thread(factory, state.settings, state.metrics, state.history)
    except Exception as exc:
        log.exception("model load failed; the service stays not ready")
        state.lifecycle.model_error = f"{type(exc).__name__}: {exc}"
        return
    state.lifecycle.owned.add("scorer")
    lower_thread_priority(runtime.threads_nice)  # before the first request starts the pools' threads
    state.models = runtime.models
    state.replica_health = runtime.replica_health
    state.online = runtime.online
    state.knowledge = runtime.knowledge
    state.explainer = runtime.explainer
    if runtime.online is not None:
        state.lifecycle.tasks.append(asyncio.create_task(runtime.online.run(), name="online-evaluation"))
    state.scorer = runtime.scorer
    state.metrics.set_model_version(runtime.scorer.model_version)
    log.info("model loaded", extra={"model_version": runtime.scorer.model_version})


async def follow_store(app: FastAPI) -> None:
    """Every ``model_poll_s``, serve the version the store's ACTIVE pointer names and route as its
    canary state says (set by any gateway sharing the store); runs until shutdown."""
    state = app.state
    while True:
        raise_if_cancelled()
        await asyncio.sleep(state.settings.model.model_poll_s)
        if state.models is None:
            continue
        try:
            await asyncio.to_thread(state.models.follow_store)
        except Exception:
            log.exception("following the store's ACTIVE pointer and canary failed; will retry")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    lifecycle: Lifecycle = state.lifecycle
    state.online = None  # the runtime's online evaluation, once loaded
    state.knowledge = None  # the runtime's knowledge refresh, once loaded
    if state.history is None:
        state.history = HistoryStore.from_settings(state.settings.history)
        lifecycle.owned.add("history")
    if state.settings.history.events_durable:  # a promise the server cannot keep is refused at startup
        await state.history.check_durable()
    loader = None
    if state.scorer is None:
        loader = asyncio.create_task(load_runtime(app, state.runtime_factory), name="load-runtime")
    else:
        state.metrics.set_model_version(state.scorer.model_version)
    follower = None
    if state.settings.model.follows_store:
        follower = asyncio.create_task(follow_store(app), name="follow-store")
    try:
        yield
    finally:
        lifecycle.begin_drain()
        # The loading thread finishes on its own and its result is dropped; a loop that outlives the bound is
        # left behind (named in the log) rather than hang the shutdown.
        await stop_tasks([t for t in (follower, loader, *lifecycle.tasks) if t is not None])
        if "scorer" in lifecycle.owned:
            if state.knowledge is not None:
                state.knowledge.close()
            if state.explainer is not None:
                state.explainer.close()
            state.scorer.close()
        if "history" in lifecycle.owned:
            await state.history.aclose()
        log.info("stopped")
