"""Logic behind ``POST /v1/explain``: the score request's limits, the explainer's answer mapped to
the wire (the explainer's value types mirror the wire types field for field)."""

from __future__ import annotations

import dataclasses

from service.api.explain.protocol import ExplainRequest, ExplainResponse
from service.api.score.serving import check_limits, scorer_errors
from service.config import RequestSettings
from service.scoring.contracts import Explainer, Explanation


def to_response(explanation: Explanation) -> ExplainResponse:
    body = dataclasses.asdict(explanation)
    body["timings"] = body.pop("timings_ms")
    body["llm_reason"] = None if explanation.llm_reason is None else str(explanation.llm_reason)
    body["degraded_reasons"] = [str(r) for r in explanation.degraded_reasons]
    return ExplainResponse.model_validate(body)


async def explain(request: ExplainRequest, *, explainer: Explainer, settings: RequestSettings) -> ExplainResponse:
    check_limits(request, settings)
    with scorer_errors(request, settings):
        explanation = await explainer.explain(request.user_id, request.candidates, request.deadline_ms)
    return to_response(explanation)
