"""Composition of the HTTP app: routers, middleware, error handlers, state. No logic here."""

from __future__ import annotations

from fastapi import FastAPI

from service.api.admin.router import router as admin_router
from service.api.admission import InflightLimit, LoadShedMiddleware
from service.api.errors import install_error_handlers
from service.api.events.router import router as events_router
from service.api.health.router import router as health_router
from service.api.lifecycle import Lifecycle, RuntimeFactory, lifespan
from service.api.metrics.router import router as metrics_router
from service.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.api.score.router import router as score_router
from service.config import Settings, get_settings
from service.history import HistoryStore
from service.metrics import Metrics
from service.scoring.contracts import Scorer


def build_app(settings: Settings | None = None, *, scorer: Scorer | None = None, runtime: RuntimeFactory | None = None,
              history: HistoryStore | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The service app, serving ``scorer`` or else what ``runtime`` builds in the lifespan (in the
    background: a model takes seconds to load). ``service.api.wiring.create_app`` passes the
    production runtime; the history store is built from settings when not given."""
    if scorer is None and runtime is None:
        raise ValueError("build_app needs a scorer or a runtime factory (service.api.wiring.create_app passes one)")
    settings = settings or get_settings()
    metrics = metrics or Metrics()
    app = FastAPI(title="RecLoRA serving", version="0.1.0", lifespan=lifespan,
                  summary="Personalized-LoRA LLM + CRM scoring of candidate items for a user.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.scorer = scorer
    app.state.runtime_factory = runtime
    app.state.models = None  # the model registry, built with the scorer by the lifespan
    app.state.replica_health = None  # remote LLM replicas' health, when the runtime has them
    app.state.history = history
    app.state.lifecycle = Lifecycle()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       limits={admin_router.prefix: settings.admin_max_upload_bytes})
    app.add_middleware(LoadShedMiddleware, metrics=metrics, retry_after_s=settings.shed_retry_after_s,
                       score=InflightLimit("/v1/score", settings.score_inflight_limit),
                       writes=InflightLimit("/v1/events", settings.events_inflight_limit))
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # added last = outermost
    for router in (health_router, metrics_router, score_router, events_router):
        app.include_router(router)
    if settings.admin_enabled:
        app.include_router(admin_router)
    return app
