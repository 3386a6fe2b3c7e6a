"""Scoring logic behind ``POST /v1/score``: configured limits, catalog check, result mapping.

``Scorer`` is the contract between the HTTP layer and the model runtime
(``service.scoring.pipeline.ScoringPipeline`` implements it); routes never touch the runtime
otherwise. The scorer degrades rather than fails, so only bad input and "no model loaded yet"
are errors here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from service.api.errors import ErrorDetail, InvalidRequest
from service.api.score.protocol import CandidateScore, ScoreRequest, ScoreResponse
from service.config import Settings
from service.scoring.result import CandidateResult, ScoreResult

__all__ = ["CandidateResult", "ScoreResult", "Scorer", "require_known_items", "score"]

MAX_LISTED_IDS = 20


class Scorer(Protocol):
    """What the HTTP layer needs from the model runtime."""

    @property
    def model_version(self) -> str:
        """The bundle version answering requests now."""
        ...

    def known_items(self, ids: Sequence[int]) -> list[int]:
        """The ids among ``ids`` that the active catalog does NOT know (empty when all are known)."""
        ...

    async def score(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None,
                    request_id: str = "") -> ScoreResult:
        """Score every candidate for the user within the deadline; degrade instead of raising."""
        ...

    def close(self) -> None:
        """Release threads and engine connections (called once, at shutdown)."""
        ...


def require_known_items(scorer: Scorer, located: Iterable[tuple[str, int]]) -> None:
    """Raise a 422 naming every (location, item id) pair whose item the catalog does not know."""
    located = list(located)
    unknown = set(scorer.known_items(list(dict.fromkeys(item for _, item in located))))
    if not unknown:
        return
    details = [ErrorDetail(loc=loc, message=f"unknown item {item}", type="unknown_item")
               for loc, item in located if item in unknown]
    ids = sorted(unknown)
    listed = ", ".join(map(str, ids[:MAX_LISTED_IDS])) + (", ..." if len(ids) > MAX_LISTED_IDS else "")
    raise InvalidRequest(details, code="unknown_items",
                         message=f"{len(ids)} item id(s) not in the catalog of model "
                                 f"{scorer.model_version}: {listed}")


def check_limits(request: ScoreRequest, settings: Settings) -> None:
    """The configured bounds the wire type cannot know."""
    problems = []
    if len(request.candidates) > settings.max_candidates:
        problems.append(ErrorDetail(loc="candidates", type="too_long",
                                    message=f"{len(request.candidates)} candidates; at most "
                                            f"{settings.max_candidates} per request"))
    if request.deadline_ms is not None and request.deadline_ms > settings.max_deadline_ms:
        problems.append(ErrorDetail(loc="deadline_ms", type="less_than_equal",
                                    message=f"at most {settings.max_deadline_ms} ms, got {request.deadline_ms}"))
    if problems:
        raise InvalidRequest(problems)


def to_response(result: ScoreResult) -> ScoreResponse:
    return ScoreResponse(
        user_id=result.user_id, model_version=result.model_version,
        scores=[CandidateScore(item_id=c.item_id, score=c.score, llm_score=c.llm_score, crm_score=c.crm_score)
                for c in result.candidates],
        degraded=result.degraded, degraded_reasons=list(result.degraded_reasons), cold_start=result.cold_start,
        timings={stage: round(ms, 3) for stage, ms in result.timings_ms.items()})


async def score(request: ScoreRequest, *, scorer: Scorer, settings: Settings, request_id: str) -> ScoreResponse:
    check_limits(request, settings)
    require_known_items(scorer, ((f"candidates[{i}]", item) for i, item in enumerate(request.candidates)))
    result = await scorer.score(request.user_id, request.candidates, request.deadline_ms, request_id)
    return to_response(result)
