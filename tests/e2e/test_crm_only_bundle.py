"""A bundle without the LLM part (CRM only) served end to end: CRM scores, not degraded."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from tests.e2e.e2e_support import LiveServer, World

from service.model import load_model
from service.scoring.stages import UserHistoryView, run_crm

CANDIDATES = [2, 13, 29, 64]
VERSION = "e2e-crm-only"


@pytest.fixture(scope="module")
def crm_only(world: World, tmp_path_factory) -> Iterator[tuple[LiveServer, object]]:
    from training.export.crm_bundle import export_crm_bundle

    store = tmp_path_factory.mktemp("crm-only-store")
    bundle = export_crm_bundle(world.data_dir, world.crm_dir, store, VERSION, description="e2e crm only")
    # The newest bundle of the store; explain on, to say why it has no LLM part to explain.
    server = LiveServer.start(world.settings(model_store=store, active_version=None, explain_enabled=True))
    yield server, bundle
    server.stop()


def test_crm_only_bundle_answers_with_crm_scores_undegraded(world: World, crm_only) -> None:
    server, bundle = crm_only
    model = load_model(bundle)
    assert model.mixer is None
    user = world.users[11]
    items, ratings, _, profile = world.histories[user]
    expected = run_crm(model, UserHistoryView.from_raw(model, items, ratings, profile),
                       model.catalog.to_dense(CANDIDATES)).scores
    with server.client() as http:
        response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == VERSION
        assert body["degraded"] is False and body["degraded_reasons"] == [] and body["cold_start"] is False
        assert [s["llm_score"] for s in body["scores"]] == [None] * len(CANDIDATES)
        assert body["score_source"] == "crm" and not any(s["llm_used"] for s in body["scores"])
        assert [s["score"] for s in body["scores"]] == [s["crm_score"] for s in body["scores"]]
        np.testing.assert_allclose([s["crm_score"] for s in body["scores"]], expected, atol=1e-5)
        assert {"history", "crm", "total"} <= set(body["timings"]) and "llm" not in body["timings"]
        assert http.get("/readyz").json()["model_version"] == VERSION


def test_crm_only_bundle_explains_that_it_has_no_llm(world: World, crm_only) -> None:
    server, _ = crm_only
    user = world.users[11]
    with server.client() as http:
        scored = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES}).json()
        response = http.post("/v1/explain", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["llm_computed"] is False and body["llm_reason"] == "no_llm" and body["degraded_reasons"] == []
    assert body["adapter"] is None and body["prompt_form"] is None and body["prefix_tokens"] is None
    for candidate, served in zip(body["candidates"], scored["scores"]):
        assert candidate["llm_score"] is None and candidate["history"] == [] and candidate["prompt_tokens"] is None
        assert candidate["crm_score"] == candidate["served_score"] == served["score"]
