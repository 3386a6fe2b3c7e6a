"""``POST /v1/explain`` over HTTP: off by default (404 in the error schema), behind the admin token
when the admin API is on, the score request's validation (422), the explainer's value types on the
wire. The explainer itself (a real model and engine) is tested end to end in tests/e2e/test_explain.py."""

from __future__ import annotations

import pytest
from tests.service.api.api_support import FormulaExplainer, FormulaScorer, assert_error, serving

from service.api import build_app
from service.api.admin.auth import new_token
from service.config import Settings
from service.scoring.contracts import Explainer

pytestmark = pytest.mark.anyio

BODY = {"user_id": "u1", "candidates": [3, 1, 2], "deadline_ms": 1500}


def test_formula_explainer_satisfies_the_protocol():
    explainer: Explainer = FormulaExplainer()
    assert explainer is not None


async def test_explain_is_off_by_default(settings: Settings):
    app = build_app(settings, scorer=FormulaScorer(), explainer=FormulaExplainer())
    async with serving(app) as client:
        assert_error(await client.post("/v1/explain", json=BODY), 404)
        assert "/v1/explain" not in (await client.get("/openapi.json")).json()["paths"]


async def test_explain_answers_each_candidate_in_request_order(settings: Settings):
    explainer = FormulaExplainer()
    app = build_app(settings.replace(explain_enabled=True), scorer=FormulaScorer(), explainer=explainer)
    async with serving(app) as client:
        response = await client.post("/v1/explain", json=BODY)
        schema = (await client.get("/openapi.json")).json()
    assert response.status_code == 200, response.text
    assert "ExplainResponse" in schema["components"]["schemas"] and "/v1/explain" in schema["paths"]
    body = response.json()
    assert explainer.calls == [{"user_id": "u1", "candidates": [3, 1, 2], "deadline_ms": 1500}]
    assert [c["item_id"] for c in body["candidates"]] == [3, 1, 2]
    assert body["llm_computed"] is False and body["llm_reason"] == "llm_timeout"
    assert body["degraded_reasons"] == ["llm_timeout"] and body["timings"] == {"crm": 1.0, "total": 2.0}
    assert body["candidates"][0]["history"] == [{"item_id": 7, "title": "Item 7", "rating": 4.0, "position": 2,
                                                 "rank": 1, "similarity": 0.9}]
    mixture = body["adapter"]["mixture"]
    assert mixture["averaged"]["top"][0]["meta_lora"] == 1 and mixture["averaged"]["top"][0]["weight"] == 0.55
    assert [g["group"] for g in mixture["layers"]] == ["layers.0", "layers.1"]


async def test_explain_validates_as_score_does(settings: Settings):
    app = build_app(settings.replace(explain_enabled=True, max_candidates=2), scorer=FormulaScorer(),
                    explainer=FormulaExplainer())
    async with serving(app) as client:
        error = assert_error(await client.post("/v1/explain", json={"user_id": "u", "candidates": [1, 2, 3]}), 422)
        assert error["details"][0]["loc"] == "candidates" and "at most 2" in error["message"]
        error = assert_error(await client.post("/v1/explain", json={"user_id": "u", "candidates": [1, 999]}), 422)
        assert error["details"][0]["loc"] == "candidates[1]" and "999" in error["details"][0]["message"]
        assert_error(await client.post("/v1/explain", json={"user_id": "u", "candidates": [1, 1]}), 422)
        assert_error(await client.post("/v1/explain", json={"user_id": "u", "candidates": []}), 422)
        assert_error(await client.post("/v1/explain", json={"user_id": "u", "candidates": [1], "extra": 1}), 422)


async def test_explain_needs_the_admin_token_when_the_admin_api_is_on(settings: Settings):
    token, digest = new_token()
    app = build_app(settings.replace(explain_enabled=True, admin_enabled=True, admin_token_sha256=[digest]),
                    scorer=FormulaScorer(), explainer=FormulaExplainer())
    async with serving(app) as client:
        assert_error(await client.post("/v1/explain", json=BODY), 401, "unauthorized")
        assert_error(await client.post("/v1/explain", json=BODY, headers={"Authorization": "Bearer wrong"}), 401)
        response = await client.post("/v1/explain", json=BODY, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("admin", [False, True])
async def test_explain_is_503_until_a_model_is_loaded(settings: Settings, admin: bool):
    token, digest = new_token()
    extra = dict(admin_enabled=True, admin_token_sha256=[digest]) if admin else {}
    app = build_app(settings.replace(explain_enabled=True, **extra), scorer=FormulaScorer())
    async with serving(app) as client:
        response = await client.post("/v1/explain", json=BODY, headers={"Authorization": f"Bearer {token}"})
        assert_error(response, 503, "model_not_ready")
