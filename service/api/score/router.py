"""HTTP transport of ``POST /v1/score``."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import RequestIdDep, ScorerDep, SettingsDep
from service.api.errors import ERROR_RESPONSES
from service.api.score import serving
from service.api.score.protocol import ScoreRequest, ScoreResponse

router = APIRouter(prefix="/v1", tags=["score"])


@router.post("/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def score(body: ScoreRequest, scorer: ScorerDep, settings: SettingsDep,
                request_id: RequestIdDep) -> ScoreResponse:
    """Score candidate items for a user: always an answer, degraded (CRM scores) rather than failed."""
    return await serving.score(body, scorer=scorer, settings=settings.requests, request_id=request_id)
