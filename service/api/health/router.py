"""Kubernetes-style probes: ``/livez`` (the process runs) and ``/readyz`` (send me traffic).

Ready means: a model is loaded, Redis answers a ping, and the server is not draining for
shutdown. The 503 lists every reason in the error schema's ``details``. Remote LLM replicas
(engine=vllm) are reported per replica but do not decide readiness: with every replica down the
gateway still answers, with CRM scores marked degraded, and taking all gateways out of rotation
would turn a degraded service into an outage.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.datastructures import State

from service.api.deps import HistoryDep, SettingsDep
from service.api.errors import ERROR_RESPONSES, ErrorDetail, Unavailable
from service.config import HistorySettings
from service.history import HistoryStore

router = APIRouter(tags=["health"])


class Component(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: str
    model_version: str
    components: dict[str, Component]
    llm_replicas: dict[str, Component] = {}


@router.get("/livez")
async def livez() -> dict[str, str]:
    """200 while the event loop runs; never checks dependencies (a Redis outage must not restart pods)."""
    return {"status": "alive"}


@router.get("/readyz", responses={503: ERROR_RESPONSES[503]})
async def readyz(request: Request, history: HistoryDep, settings: SettingsDep) -> Readiness:
    """200 with component status when ready; 503 naming what is missing otherwise."""
    state = request.app.state
    components = {"model": _model_status(state), "redis": await _redis_status(history, settings.history)}
    if state.lifecycle.draining:
        components["server"] = Component(ok=False, detail="shutting down")
    failing = [ErrorDetail(loc=name, message=c.detail, type="not_ready") for name, c in components.items() if not c.ok]
    if failing:
        raise Unavailable("not ready: " + "; ".join(f"{d.loc} {d.message}" for d in failing),
                          code="not_ready", details=failing)
    return Readiness(status="ready", model_version=state.scorer.model_version, components=components,
                     llm_replicas=_replica_status(state))


def _replica_status(state: State) -> dict[str, Component]:
    health = state.replica_health
    if health is None:
        return {}
    return {url: Component(ok=up, detail="up" if up else "down (requests re-routed)") for url, up in health().items()}


def _model_status(state: State) -> Component:
    if state.scorer is not None:
        return Component(ok=True, detail=f"version {state.scorer.model_version}")
    if state.lifecycle.model_error:
        return Component(ok=False, detail=f"load failed: {state.lifecycle.model_error}")
    return Component(ok=False, detail="loading")


async def _redis_status(history: HistoryStore, settings: HistorySettings) -> Component:
    try:
        ok = await asyncio.wait_for(history.ping(), timeout=2 * settings.redis_timeout_s)
    except TimeoutError:
        ok = False
    return Component(ok=True, detail="ping ok") if ok else Component(ok=False, detail="does not answer a ping")
