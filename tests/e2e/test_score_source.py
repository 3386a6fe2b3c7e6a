"""What a response says made its scores, over real HTTP: ``score_source`` and ``llm_used``.

A bundle whose fusion did not beat its CRM on validation (the export decided ``serve: crm``)
answers with the CRM's scores and never runs its LLM: no forward, no background job, no adapter;
a bundle exported before fusion.json existed (an LLM, no fusion) keeps serving the LLM's score,
marked ``llm``; the world's bundle (fused) is the control, on which the same forward counter
counts forwards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.e2e.e2e_support import LiveServer, World, export_serving_crm, metric_value

from service.bundle import MANIFEST_NAME
from service.model import load_model
from service.scoring.stages import UserHistoryView, run_crm

CANDIDATES = [2, 13, 29, 64, 71]
CRM_VERSION, LLM_VERSION = "e2e-serves-crm", "e2e-no-fusion"
LLM_STAGES = {"retrieval", "prompts", "adapter", "llm_cache", "llm"}


def count_forwards(server: LiveServer) -> list[int]:
    """Rows of every packed forward the server's engine runs from now on (its observer hook)."""
    rows: list[int] = []
    server.app.state.scorer.engine.observe_rows = lambda batch: rows.append(len(batch))
    return rows


def without_fusion(bundle: Path, out: Path, version: str) -> Path:
    """A copy of ``bundle`` as exports wrote it before fusion.json existed: the LLM, no fusion."""
    shutil.copytree(bundle, out)
    (out / "fusion.json").unlink()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "fusion.json"]
    manifest["version"] = version
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def store(world: World, tmp_path_factory) -> Path:
    """CRM_VERSION: the world's LoRA beside a CRM that ranks validation well, with a fusion that
    ranks as the LLM alone does, so the export decides ``serve: crm``; LLM_VERSION: the world's
    bundle without its fusion.json."""
    root = tmp_path_factory.mktemp("score-source")
    store = root / "store"
    export_serving_crm(world, root, store, CRM_VERSION)
    without_fusion(world.bundle_dir, store / LLM_VERSION, LLM_VERSION)
    return store


@pytest.fixture(scope="module")
def serves_crm(world: World, store: Path) -> Iterator[LiveServer]:
    # With the LLM score cache on, so a background job for the LLM would have somewhere to go.
    server = LiveServer.start(world.settings(model_store=store, active_version=CRM_VERSION, llm_score_cache=True))
    yield server
    server.stop()


def post(server: LiveServer, user: str) -> dict:
    with server.client() as http:
        response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_bundle_whose_fusion_loses_to_its_crm_serves_the_crm_and_never_runs_the_llm(
        world: World, store: Path, serves_crm: LiveServer) -> None:
    model = load_model(store / CRM_VERSION)
    validation = model.fusion.validation
    assert model.mixer is not None and model.fusion.serve == "crm"  # an LLM in the bundle, and not served
    assert validation.fused_auc < validation.crm_auc
    forwards = count_forwards(serves_crm)
    with serves_crm.client() as http:
        before = http.get("/metrics").text
    for user in world.users[:3]:
        body = post(serves_crm, user)
        assert body["model_version"] == CRM_VERSION and body["score_source"] == "crm"
        assert body["degraded"] is False and body["degraded_reasons"] == []  # a decision, not a fallback
        assert [s["llm_score"] for s in body["scores"]] == [None] * len(CANDIDATES)
        assert [s["llm_used"] for s in body["scores"]] == [False] * len(CANDIDATES)
        assert [s["score"] for s in body["scores"]] == [s["crm_score"] for s in body["scores"]]
        items, ratings, _, profile = world.histories[user]
        expected = run_crm(model, UserHistoryView.from_raw(model, items, ratings, profile),
                           model.catalog.to_dense(CANDIDATES)).scores
        np.testing.assert_allclose([s["crm_score"] for s in body["scores"]], expected, atol=1e-5)
        assert not LLM_STAGES & set(body["timings"]), body["timings"]
    with serves_crm.client() as http:
        after = http.get("/metrics").text
    assert forwards == []  # no forward, live or in the background
    for name, labels in (("reclora_candidates_total", {"llm": "none"}),):
        assert metric_value(after, name, labels) - metric_value(before, name, labels) == 3 * len(CANDIDATES)
    for outcome in ("live", "cached", "deadline", "overrun", "queue"):
        assert metric_value(after, "reclora_llm_admissions_total", {"outcome": outcome}) == 0
    assert metric_value(after, "reclora_adapter_cache_misses_total") == 0  # no adapter was ever built
    assert serves_crm.app.state.scorer.scheduler.backlog_ms() == 0


def test_a_bundle_without_fusion_serves_the_llm_score_marked_llm(world: World, store: Path) -> None:
    server = LiveServer.start(world.settings(model_store=store, active_version=LLM_VERSION))
    try:
        forwards = count_forwards(server)
        body = post(server, world.users[0])
    finally:
        server.stop()
    assert body["model_version"] == LLM_VERSION and body["score_source"] == "llm" and body["degraded"] is False
    assert all(s["llm_used"] and s["score"] == s["llm_score"] for s in body["scores"]), body["scores"]
    assert forwards  # the LLM ran


def test_the_fused_world_bundle_says_fused_and_runs_its_llm(world: World, live: LiveServer) -> None:
    forwards = count_forwards(live)
    try:
        body = post(live, world.users[1])
    finally:
        live.app.state.scorer.engine.observe_rows = None
    assert body["score_source"] == "fused" and body["degraded"] is False
    assert all(s["llm_used"] and s["llm_score"] is not None for s in body["scores"])
    assert all(s["score"] != s["llm_score"] for s in body["scores"])  # fused, not the LLM's as it is
    assert forwards  # the hook that saw no forward above sees these
