"""Composition of the HTTP app: routers, middleware, error handlers, state, docs. No logic here.

The docs pages load Swagger UI and ReDoc from files installed with the ``fastapi-offline``
package, served under ``/docs/static``: no CDN, so they render on hosts without internet access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.api.admin.auth import require_admin
from service.api.admin.router import router as admin_router
from service.api.admission import LoadShedMiddleware
from service.api.errors import install_error_handlers
from service.api.events.router import router as events_router
from service.api.explain.router import router as explain_router
from service.api.fields import exact_integer_bounds
from service.api.health.router import router as health_router
from service.api.lifecycle import Lifecycle, RuntimeFactory, lifespan
from service.api.metrics.router import router as metrics_router
from service.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.api.score.router import router as score_router
from service.api.users.router import router as users_router
from service.config import Settings, get_settings
from service.history import HistoryStore
from service.metrics import Metrics
from service.scoring.contracts import Explainer, Scorer

OPENAPI_URL = "/openapi.json"
DOCS_STATIC = "/docs/static"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON = DOCS_FILES = (
    "swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def build_app(settings: Settings | None = None, *, scorer: Scorer | None = None, runtime: RuntimeFactory | None = None,
              history: HistoryStore | None = None, metrics: Metrics | None = None,
              explainer: Explainer | None = None) -> FastAPI:
    """The service app, serving ``scorer`` or else what ``runtime`` builds in the lifespan (in the
    background: a model takes seconds to load). ``service.api.wiring.create_app`` passes the
    production runtime; the history store is built from settings when not given. ``/v1/explain``
    exists only with ``explain_enabled`` (else 404), behind the admin token when the admin API is on;
    its ``explainer`` comes with the runtime, or is given beside a ``scorer``."""
    if scorer is None and runtime is None:
        raise ValueError("build_app needs a scorer or a runtime factory (service.api.wiring.create_app passes one)")
    settings = settings or get_settings()
    metrics = metrics or Metrics()
    app = FastAPI(title="RecLoRA serving", version="0.1.0", lifespan=lifespan,
                  summary="Personalized-LoRA LLM + CRM scoring of candidate items for a user.",
                  openapi_url=OPENAPI_URL if settings.http.docs_enabled else None, docs_url=None, redoc_url=None)
    app.openapi = _exact_openapi(app)  # type: ignore[method-assign]
    docs_paths = _install_docs(app) if settings.http.docs_enabled else frozenset()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.scorer = scorer
    app.state.explainer = explainer
    app.state.runtime_factory = runtime
    app.state.models = None  # the model registry, built with the scorer by the lifespan
    app.state.replica_health = None  # remote LLM replicas' health, when the runtime has them
    app.state.history = history
    app.state.lifecycle = Lifecycle()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.http.max_body_bytes,
                       limits={admin_router.prefix: settings.admin.admin_max_upload_bytes})
    app.add_middleware(LoadShedMiddleware, metrics=metrics, settings=settings.requests)
    app.add_middleware(RequestContextMiddleware, metrics=metrics,  # added last = outermost
                       fixed_routes=docs_paths)
    for router in (health_router, metrics_router, score_router, events_router, users_router):
        app.include_router(router)
    if settings.explain.explain_enabled:
        guard = [Depends(require_admin)] if settings.admin.admin_enabled else []
        app.include_router(explain_router, dependencies=guard)
    if settings.admin.admin_enabled:
        app.include_router(admin_router)
    return app


def _exact_openapi(app: FastAPI) -> Any:
    """``app.openapi`` with exact integer bounds (FastAPI publishes them as floats)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = exact_integer_bounds(FastAPI.openapi(app))
        return app.openapi_schema

    return openapi


def _install_docs(app: FastAPI) -> frozenset[str]:
    """Swagger UI at /docs and ReDoc at /redoc on the installed assets; returns the paths served
    without a route template (the document and the assets), for the request metrics' labels."""
    missing = [name for name in DOCS_FILES if not (DOCS_ASSETS / name).is_file()]
    if missing:
        raise RuntimeError(f"the docs assets {missing} are missing from {DOCS_ASSETS}; reinstall fastapi-offline")
    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=root + OPENAPI_URL, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{DOCS_STATIC}/{SWAGGER_JS}",
                                   swagger_css_url=f"{root}{DOCS_STATIC}/{SWAGGER_CSS}",
                                   swagger_favicon_url=f"{root}{DOCS_STATIC}/{FAVICON}")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(openapi_url=root + OPENAPI_URL, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_STATIC}/{REDOC_JS}",
                              redoc_favicon_url=f"{root}{DOCS_STATIC}/{FAVICON}", with_google_fonts=False)

    return frozenset({OPENAPI_URL, *(f"{DOCS_STATIC}/{name}" for name in DOCS_FILES)})
