"""POST /v1/score end to end: real HTTP, real Redis, a real exported bundle and base LLM.

The served LLM probabilities are checked against an independent float32 recomputation
(``e2e_support.Reference``), the CRM probabilities against the bundle's CRM, and the final score
against the bundle's fusion.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from tests.e2e.e2e_support import LiveServer, Reference, World, assert_error, engine_dtype, llm_atol, metric_value

CANDIDATES = [3, 17, 42, 58, 71, 80]
STAGES = {"history", "crm", "retrieval", "adapter", "llm", "total"}
# The loosest LLM tolerance (a bfloat16 engine against the float32 reference; see ``llm_atol``):
# where a check must hold whatever dtype ``torch_dtype=auto`` picks on this machine.
BF16_ATOL = llm_atol(torch.bfloat16)
# The CRM runs in float32 on both sides from the same weights and inputs.
CRM_ATOL = 1e-5


def score(http: httpx.Client, user: str, candidates=CANDIDATES, **extra) -> dict:
    response = http.post("/v1/score", json={"user_id": user, "candidates": list(candidates), **extra})
    assert response.status_code == 200, response.text
    return response.json()


def column(body: dict, key: str) -> np.ndarray:
    return np.asarray([s[key] for s in body["scores"]], dtype=np.float64)


def expected_final(reference: Reference, llm: np.ndarray, crm: np.ndarray) -> np.ndarray:
    return reference.fusion(llm, crm) if reference.fusion is not None else llm


# The service fuses its float32 probabilities in float32; recomputing the fusion in float64 from the
# served (float32-valued) numbers agrees to float32 rounding.
FUSION_RTOL = 1e-6


@pytest.fixture(scope="module")
def bf16_live(world: World) -> Iterator[LiveServer]:
    """A second service with the engine forced to bfloat16 (``auto`` picks float32 on CPUs without
    native bfloat16), so the bfloat16 serving path is covered on every machine."""
    server = LiveServer.start(world.settings(torch_dtype="bfloat16"))
    yield server
    server.stop()


@pytest.fixture(params=["auto", "bfloat16"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[httpx.Client, torch.dtype]]:
    """(HTTP client, engine dtype) of the service with ``torch_dtype`` auto (the default) or bfloat16."""
    live: LiveServer = request.getfixturevalue("live" if request.param == "auto" else "bf16_live")
    if request.param == "bfloat16":
        assert engine_dtype(live) == torch.bfloat16
    with live.client() as client:
        yield client, engine_dtype(live)


def test_known_user_gets_personalized_llm_crm_and_fused_scores(world: World, served, reference: Reference) -> None:
    http, dtype = served
    user = world.users[0]
    body = score(http, user)

    assert body["user_id"] == user
    assert body["model_version"] == world.version
    assert body["degraded"] is False and body["degraded_reasons"] == []
    assert body["cold_start"] is False
    assert STAGES <= set(body["timings"]), body["timings"]
    assert all(ms >= 0 for ms in body["timings"].values())
    assert [s["item_id"] for s in body["scores"]] == CANDIDATES
    for key in ("score", "llm_score", "crm_score"):
        values = column(body, key)
        assert ((values > 0) & (values < 1)).all(), (key, values)

    crm, llm = column(body, "crm_score"), column(body, "llm_score")
    np.testing.assert_allclose(crm, reference.crm(user, CANDIDATES).scores, atol=CRM_ATOL)
    np.testing.assert_allclose(llm, reference.llm_scores(user, CANDIDATES), atol=llm_atol(dtype))
    assert reference.fusion is not None  # the bundle was exported with fusion.json
    np.testing.assert_allclose(column(body, "score"), expected_final(reference, llm, crm), rtol=FUSION_RTOL)


def test_engine_code_path_in_float32_equals_the_reference(world: World, reference: Reference) -> None:
    """What the service runs (mixer -> adapter -> LoRA slots, prefix KV reuse), in float32: equal to
    the reference up to float32 rounding, so a bfloat16 service's tolerance is bfloat16 rounding only."""
    import torch
    from transformers import AutoModelForCausalLM

    from service.engine.torch_engine import TorchEngine
    from service.scoring.stages import build_adapter

    model = reference.model
    llm = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32, local_files_only=True)
    engine = TorchEngine(llm, yes_id=reference.builder.yes_id, no_id=reference.builder.no_id,
                         target_modules=model.lora_config.target_modules)
    user = world.users[0]
    adapter = build_adapter(model, user, model.mixer.mixtures(reference.crm(user, CANDIDATES).user_rep))
    prefix, suffixes = reference.sequences(user, CANDIDATES)
    np.testing.assert_allclose(engine.score(adapter, prefix, suffixes), reference.llm_scores(user, CANDIDATES),
                               atol=1e-4)


def test_personalization_is_live_and_the_embedded_engine_builds_no_user_adapter(world: World, live: LiveServer,
                                                                               http: httpx.Client,
                                                                               reference: Reference) -> None:
    """Each user's mixture is computed in the engine's forward: the adapter cache is never used."""
    a, b = world.users[1], world.users[2]
    metrics = http.get("/metrics").text
    hits0 = metric_value(metrics, "reclora_adapter_cache_hits_total")
    misses0 = metric_value(metrics, "reclora_adapter_cache_misses_total")

    first_a, first_b = score(http, a), score(http, b)
    llm_a, llm_b = column(first_a, "llm_score"), column(first_b, "llm_score")
    assert np.abs(llm_a - llm_b).max() > 1e-3, (llm_a, llm_b)

    # The difference is the adapter's, not only the prompt's: A's prompts under B's adapter score
    # differently, and what the service answered is A's own adapter.
    own, crossed = reference.llm_scores(a, CANDIDATES), reference.llm_scores(a, CANDIDATES, adapter_user=b)
    assert np.abs(own - crossed).max() > 5 * BF16_ATOL, (own, crossed)
    np.testing.assert_allclose(llm_a, own, atol=llm_atol(engine_dtype(live)))

    again = score(http, a)
    metrics = http.get("/metrics").text
    assert metric_value(metrics, "reclora_adapter_cache_misses_total") == misses0
    assert metric_value(metrics, "reclora_adapter_cache_hits_total") == hits0
    np.testing.assert_allclose(column(again, "llm_score"), llm_a, atol=1e-6)
    np.testing.assert_allclose(column(again, "crm_score"), column(first_a, "crm_score"), atol=1e-9)


def test_unknown_user_is_scored_as_cold_start(world: World, live: LiveServer, http: httpx.Client,
                                              reference: Reference) -> None:
    user = f"e2e-nobody-{uuid.uuid4().hex[:8]}"
    body = score(http, user)
    assert body["cold_start"] is True
    assert body["degraded"] is False and body["degraded_reasons"] == []
    assert body["model_version"] == world.version
    for key in ("score", "llm_score", "crm_score"):
        values = column(body, key)
        assert ((values > 0) & (values < 1)).all(), (key, values)
    crm, llm = column(body, "crm_score"), column(body, "llm_score")
    np.testing.assert_allclose(crm, reference.crm(user, CANDIDATES).scores, atol=CRM_ATOL)
    np.testing.assert_allclose(llm, reference.llm_scores(user, CANDIDATES), atol=llm_atol(engine_dtype(live)))
    np.testing.assert_allclose(column(body, "score"), expected_final(reference, llm, crm), rtol=FUSION_RTOL)


@pytest.mark.parametrize(("payload", "code", "loc", "kind"), [
    ({"candidates": []}, "invalid_request", "candidates", "too_short"),
    ({"candidates": [3, 17, 3]}, "invalid_request", "candidates", "duplicate_items"),
    ({"candidates": [3, 999_999, 17]}, "unknown_items", "candidates[1]", "unknown_item"),
    ({"candidates": [3], "deadline_ms": 999_999}, "invalid_request", "deadline_ms", "less_than_equal"),
], ids=["empty", "duplicate", "unknown-item", "deadline-over-max"])
def test_bad_requests_get_422_in_the_one_error_schema(world: World, http: httpx.Client, payload: dict, code: str,
                                                      loc: str, kind: str) -> None:
    response = http.post("/v1/score", json={"user_id": world.users[0], **payload})
    error = assert_error(response, 422, code)
    assert [(d["loc"], d["type"]) for d in error["details"]] == [(loc, kind)], error


def test_whole_catalog_as_candidates_spans_several_engine_chunks(world: World, live: LiveServer, http: httpx.Client,
                                                                 reference: Reference) -> None:
    """Every catalog item at once: more candidates than one engine chunk, answered in request order."""
    user = world.users[8]
    candidates = list(range(world.n_items, 0, -1))  # raw ids 1..n, in reverse order
    body = score(http, user, candidates)
    assert body["degraded"] is False, body
    assert [s["item_id"] for s in body["scores"]] == candidates
    np.testing.assert_allclose(column(body, "llm_score"), reference.llm_scores(user, candidates),
                               atol=llm_atol(engine_dtype(live)))
    np.testing.assert_allclose(column(body, "crm_score"), reference.crm(user, candidates).scores, atol=CRM_ATOL)


def test_concurrent_requests_each_get_their_own_users_answer(world: World, live: LiveServer,
                                                             http: httpx.Client) -> None:
    """Requests of different users in flight together share one engine, and packed, its forwards:
    each must be scored with its own adapter and history as when it is alone (in float32 within
    1e-5; in bfloat16 a packed forward rounds each user's LoRA term in another order, within the
    engine's tolerance and far below the spread between two users' adapters)."""
    from concurrent.futures import ThreadPoolExecutor

    users = world.users[7:11]
    alone = {user: score(http, user) for user in users}

    def ask(user: str) -> tuple[str, dict]:
        with live.client() as own:
            return user, score(own, user)

    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, users * 2))
    atol = 1e-5 if engine_dtype(live) == torch.float32 else llm_atol(engine_dtype(live))
    for user, body in together:
        assert body["degraded"] is False, body
        np.testing.assert_allclose(column(body, "llm_score"), column(alone[user], "llm_score"), atol=atol)
        np.testing.assert_allclose(column(body, "crm_score"), column(alone[user], "crm_score"), atol=1e-9)
        np.testing.assert_allclose(column(body, "score"), column(alone[user], "score"), atol=atol)


def test_ready_with_the_bundle_version(world: World, http: httpx.Client) -> None:
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["model_version"] == world.version
    assert body["components"]["model"]["ok"] and body["components"]["redis"]["ok"]
    assert metric_value(http.get("/metrics").text, "reclora_model_info", {"version": world.version}) == 1
