"""Scoring logic behind ``POST /v1/score``: configured limits, result mapping.

The scorer (``service.scoring.contracts.Scorer``) checks the candidates against the catalog of
the version that scores them, in the same snapshot, and degrades rather than fails; so only bad
input and "no model loaded yet" are errors here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.api.errors import ErrorDetail, InvalidRequest, Overloaded, unknown_items_error
from service.api.score.protocol import CandidateScore, ScoreRequest, ScoreResponse
from service.config import RequestSettings
from service.scoring.contracts import Overloaded as ScorerOverloaded
from service.scoring.contracts import ScoreResult, Scorer, ScoreSource, UnknownItems


def check_limits(request: ScoreRequest, settings: RequestSettings) -> None:
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


@contextmanager
def scorer_errors(request: ScoreRequest, settings: RequestSettings) -> Iterator[None]:
    """The scorer's refusals as the wire's errors: unknown candidates (422, each located), overload
    (429 with Retry-After); for every route that scores a request's candidates."""
    try:
        yield
    except UnknownItems as exc:
        located = ((f"candidates[{i}]", item) for i, item in enumerate(request.candidates))
        raise unknown_items_error(located, exc.items, exc.model_version) from None
    except ScorerOverloaded as exc:
        raise Overloaded(str(exc), retry_after_s=max(exc.retry_after_s, settings.shed_retry_after_s)) from None


def to_response(result: ScoreResult) -> ScoreResponse:
    runs_llm = result.score_source is not ScoreSource.CRM
    return ScoreResponse(
        user_id=result.user_id, model_version=result.model_version,
        scores=[CandidateScore(item_id=c.item_id, score=c.score, llm_score=c.llm_score, crm_score=c.crm_score,
                               llm_used=runs_llm and c.llm_score is not None)
                for c in result.candidates],
        degraded=result.degraded, degraded_reasons=[str(r) for r in result.degraded_reasons],
        cold_start=result.cold_start, score_source=result.score_source,
        timings={stage: round(ms, 3) for stage, ms in result.timings_ms.items()}, adapter=result.adapter)


async def score(request: ScoreRequest, *, scorer: Scorer, settings: RequestSettings,
                request_id: str) -> ScoreResponse:
    check_limits(request, settings)
    with scorer_errors(request, settings):
        result = await scorer.score(request.user_id, request.candidates, request.deadline_ms, request_id)
    return to_response(result)
