"""Route dependencies: the services the lifespan put on ``app.state``, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import Unavailable
from service.config import Settings
from service.history import HistoryStore
from service.logging import request_id_var
from service.metrics import Metrics
from service.scoring.contracts import Explainer, KnowledgeRefresh, OnlineEvaluation, Scorer


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _history(request: Request) -> HistoryStore:
    return request.app.state.history


def _scorer(request: Request) -> Scorer:
    scorer = request.app.state.scorer
    if scorer is None:
        raise Unavailable("the model is not loaded yet", code="model_not_ready", retry_after_s=5)
    return scorer


def _explainer(request: Request) -> Explainer:
    explainer = request.app.state.explainer
    if explainer is None:
        raise Unavailable("the model is not loaded yet", code="model_not_ready", retry_after_s=5)
    return explainer


def _online(request: Request) -> OnlineEvaluation | None:
    """The online evaluation of served scores; None until the runtime is loaded, or without one."""
    return request.app.state.online


def _knowledge(request: Request) -> KnowledgeRefresh | None:
    """The nearline refresh of users' knowledge vectors; None until the runtime is loaded, or when off."""
    return request.app.state.knowledge


def _request_id() -> str:
    return request_id_var.get() or ""


SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
HistoryDep = Annotated[HistoryStore, Depends(_history)]
ScorerDep = Annotated[Scorer, Depends(_scorer)]
ExplainerDep = Annotated[Explainer, Depends(_explainer)]
RequestIdDep = Annotated[str, Depends(_request_id)]
OnlineDep = Annotated[OnlineEvaluation | None, Depends(_online)]
KnowledgeDep = Annotated[KnowledgeRefresh | None, Depends(_knowledge)]
