"""POST /v1/score: the response shape, pass-through to the scorer, degraded answers, not-ready."""

from __future__ import annotations

import httpx
import pytest
from tests.service.api.api_support import FormulaScorer, assert_error, serving

from service.api import build_app
from service.api.lifecycle import Runtime
from service.api.score.serving import to_response
from service.scoring.contracts import CandidateResult, Scorer, ScoreResult, ScoreSource
from service.config import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.both_redis]  # the single node and the cluster


def test_formula_scorer_satisfies_the_protocol():
    scorer: Scorer = FormulaScorer()  # a static check as much as a runtime one
    assert scorer.unknown_items([1, 100, 101, 0]) == [101, 0]


async def test_scores_every_candidate_in_request_order(client: httpx.AsyncClient, scorer: FormulaScorer):
    response = await client.post("/v1/score", json={"user_id": "u1", "candidates": [42, 7, 99]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == "u1" and body["model_version"] == "formula-v1"
    assert [s["item_id"] for s in body["scores"]] == [42, 7, 99]
    for s in body["scores"]:
        crm, llm = FormulaScorer.crm(s["item_id"]), FormulaScorer.llm(s["item_id"])
        assert s == pytest.approx({"item_id": s["item_id"], "score": (crm + llm) / 2, "llm_score": llm,
                                   "crm_score": crm, "llm_used": True})
    assert body["score_source"] == "fused"
    assert body["degraded"] is False and body["degraded_reasons"] == []
    assert body["cold_start"] is True
    assert body["timings"] == {"history": 0.5, "crm": 1.25, "total": 2.0}


async def test_deadline_and_request_id_reach_the_scorer(client: httpx.AsyncClient, scorer: FormulaScorer):
    response = await client.post("/v1/score", json={"user_id": "u1", "candidates": [1], "deadline_ms": 250},
                                 headers={"X-Request-ID": "req-123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-123"
    assert scorer.calls == [{"user_id": "u1", "candidates": [1], "deadline_ms": 250, "request_id": "req-123"}]
    await client.post("/v1/score", json={"user_id": "u1", "candidates": [1]})
    assert scorer.calls[-1]["deadline_ms"] is None  # the scorer applies the configured default


async def test_max_candidates_and_deadline_are_accepted_at_the_bound(client: httpx.AsyncClient):
    response = await client.post("/v1/score", json={"user_id": "u1", "candidates": list(range(1, 101)),
                                                    "deadline_ms": 10_000})
    assert response.status_code == 200 and len(response.json()["scores"]) == 100


async def test_degraded_answer_is_200_with_reasons(client: httpx.AsyncClient, scorer: FormulaScorer):
    scorer.degraded_reasons = ["llm_timeout"]
    body = (await client.post("/v1/score", json={"user_id": "u1", "candidates": [3]})).json()
    assert body["degraded"] is True and body["degraded_reasons"] == ["llm_timeout"]
    assert body["scores"][0]["llm_score"] is None and body["scores"][0]["llm_used"] is False
    assert body["scores"][0]["score"] == pytest.approx(FormulaScorer.crm(3))


@pytest.mark.parametrize(("source", "llm_used"), [("fused", True), ("llm", True), ("crm", False)])
def test_the_response_says_what_made_each_score(source: str, llm_used: bool):
    result = ScoreResult("u1", "v1", [CandidateResult(1, 0.6, 0.7, 0.5), CandidateResult(2, 0.4, None, 0.4)],
                         score_source=ScoreSource(source))
    response = to_response(result)
    assert response.score_source == source and response.model_dump(mode="json")["score_source"] == source
    assert [s.llm_used for s in response.scores] == [llm_used, False]  # no LLM score: never used


async def test_user_with_history_is_not_cold_start(client: httpx.AsyncClient):
    ok = await client.post("/v1/events", json={"user_id": "u7", "events": [
        {"item_id": 4, "rating": 5.0, "timestamp": 1_700_000_000}]})
    assert ok.status_code == 200, ok.text
    body = (await client.post("/v1/score", json={"user_id": "u7", "candidates": [3]})).json()
    assert body["cold_start"] is False


async def test_limits_come_from_settings(settings: Settings, scorer: FormulaScorer):
    app = build_app(settings.replace(max_candidates=2, max_deadline_ms=100, default_deadline_ms=100), scorer=scorer)
    async with serving(app) as client:
        error = assert_error(await client.post("/v1/score", json={"user_id": "u", "candidates": [1, 2, 3]}), 422)
        assert error["details"][0]["loc"] == "candidates" and "at most 2" in error["message"]
        error = assert_error(await client.post("/v1/score", json={"user_id": "u", "candidates": [1],
                                                                  "deadline_ms": 101}), 422)
        assert error["details"][0]["loc"] == "deadline_ms"


def never_loads(settings, metrics, history) -> Runtime:
    raise RuntimeError("this test's runtime never loads")


async def test_score_is_503_until_a_model_is_loaded(settings: Settings):
    async with serving(build_app(settings, runtime=never_loads)) as client:
        response = await client.post("/v1/score", json={"user_id": "u1", "candidates": [1]})
        error = assert_error(response, 503, "model_not_ready")
        assert response.headers["retry-after"] == "5"
        assert "not loaded" in error["message"]
