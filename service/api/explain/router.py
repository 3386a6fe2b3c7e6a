"""HTTP transport of ``POST /v1/explain`` (mounted only when RECLORA_EXPLAIN_ENABLED; with the
admin API on, behind its token: ``service.api.app``)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ExplainerDep, SettingsDep
from service.api.errors import ERROR_RESPONSES
from service.api.explain import serving
from service.api.explain.protocol import ExplainRequest, ExplainResponse

router = APIRouter(prefix="/v1", tags=["explain"])


@router.post("/explain", response_model=ExplainResponse, responses=ERROR_RESPONSES)
async def explain(body: ExplainRequest, explainer: ExplainerDep, settings: SettingsDep) -> ExplainResponse:
    """Take a request's scores apart: CRM, LLM (computed now, even where the version serves its CRM
    alone), fusion, what is served, the history each prompt read, the user's gate mixture. Serves
    nothing and writes nothing that /v1/score reads."""
    return await serving.explain(body, explainer=explainer, settings=settings.requests)
