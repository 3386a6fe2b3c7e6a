"""``POST /v1/explain`` over real HTTP on a real model, engine and Redis.

The explanation's LLM scores are the engine's for the same prompts (built here with the serving
stages and scored through the same engine); explaining writes nothing that ``/v1/score`` reads
(every key under the gateway's prefix, with the score cache and served-score log on, is as it
was) and changes no score; its LLM forward waits in the engine's request queue and gives up at
its deadline; a version that serves its CRM alone still has its LLM explained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
from tests.e2e.e2e_support import LiveServer, World, export_serving_crm, read_history
from tests.http_support import wait_for
from tests.redis_support import REDIS_URL

from service.engine.base import EngineCall
from service.scoring.stages import UserHistoryView, run_crm, text_inputs, user_adapter

CANDIDATES = [2, 13, 29, 64, 71]
SERVES_CRM = "e2e-explain-serves-crm"


@pytest.fixture(scope="module")
def explaining(world: World) -> Iterator[LiveServer]:
    # The score cache and the served-score log on: both are what explain must leave alone.
    server = LiveServer.start(world.settings(explain_enabled=True, llm_score_cache=True, served_log=True))
    yield server
    server.stop()


def post(server: LiveServer, path: str, body: dict) -> dict:
    with server.client() as http:
        response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def explain(server: LiveServer, user: str, candidates=CANDIDATES, **extra) -> dict:
    return post(server, "/v1/explain", {"user_id": user, "candidates": candidates, **extra})


def stored_state(prefix: str) -> dict[str, tuple[str, int]]:
    """Every key under the prefix with its type and size: what any write would change."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        state = {}
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = client.type(key).decode()
            size = {"stream": client.xlen, "hash": client.hlen, "list": client.llen, "zset": client.zcard,
                    "set": client.scard}.get(kind, client.strlen)(key)
            state[key.decode()] = (kind, size)
        return state
    finally:
        client.close()


def settled_state(prefix: str, quiet_s: float = 0.5, timeout_s: float = 20.0) -> dict[str, tuple[str, int]]:
    """The stored state once it stopped changing (the served log and score cache write off the request path)."""
    end = time.monotonic() + timeout_s
    last = stored_state(prefix)
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = stored_state(prefix)
        if now == last:
            return now
        last = now
    raise AssertionError("the stored state kept changing")


def test_explain_llm_scores_are_the_engines_for_the_same_prompts(world: World, explaining: LiveServer) -> None:
    user = world.users[3]
    body = explain(explaining, user)
    assert body["llm_computed"] is True and body["llm_reason"] is None, body
    pipeline = explaining.app.state.scorer
    snapshot = pipeline.holder.snapshot()
    model, builder = snapshot.model, snapshot.builder
    stored = read_history(world, user)
    view = UserHistoryView.from_raw(model, stored.items, stored.ratings, stored.profile)
    dense = model.catalog.to_dense(CANDIDATES)
    crm = run_crm(model, view, dense)
    prompts = text_inputs(builder, model, view, dense)
    adapter = user_adapter(model, user, crm.user_rep, None, pipeline.engine)
    engine_scores = pipeline.scheduler.submit_call(
        pipeline.engine, EngineCall(adapter, prompts.prefix, prompts.suffixes), 0.0).result(120)

    got = body["candidates"]
    assert [c["item_id"] for c in got] == CANDIDATES
    llm = np.array([c["llm_score"] for c in got])
    np.testing.assert_allclose(llm, engine_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose([c["crm_score"] for c in got], crm.scores, rtol=0, atol=1e-6)
    fused = model.fusion(llm, crm.scores)
    np.testing.assert_allclose([c["fused_score"] for c in got], fused, rtol=0, atol=1e-9)
    assert body["score_source"] == "fused"
    np.testing.assert_allclose([c["served_score"] for c in got], fused, rtol=0, atol=1e-9)
    assert body["prefix_tokens"] == len(prompts.prefix)
    assert [c["prompt_tokens"] for c in got] == [len(prompts.prefix) + len(s) for s in prompts.suffixes]
    assert body["history_length"] == len(view.items) and body["prompt_form"] == builder.config.form

    # Each candidate's history is what its prompt read, ranked by similarity to it.
    embeddings = model.catalog.embeddings
    for i, candidate in enumerate(got):
        positions = [b["position"] for b in candidate["history"]]
        assert positions == prompts.read[i].tolist() and positions
        for b in candidate["history"]:
            item = view.items[b["position"]]
            assert b["item_id"] == model.catalog.to_raw(item)
            assert b["rating"] == pytest.approx(float(view.ratings[b["position"]]))
            assert b["similarity"] == pytest.approx(float(embeddings[item] @ embeddings[dense[i]]), abs=1e-5)
        by_rank = sorted(candidate["history"], key=lambda b: b["rank"])
        assert [b["rank"] for b in by_rank] == list(range(1, len(by_rank) + 1))
        assert [b["similarity"] for b in by_rank] == sorted((b["similarity"] for b in by_rank), reverse=True)

    # The gate mixture: the user's own, per layer group and averaged.
    adapter_out = body["adapter"]
    assert adapter_out["kind"] == "meta_loras" and adapter_out["prototype"] is None
    alphas = model.mixer.mixtures(crm.user_rep).numpy()
    averaged = adapter_out["mixture"]["averaged"]
    assert averaged["modules"] == len(model.mixer.module_names)
    assert averaged["top"][0]["meta_lora"] == int(alphas.mean(0).argmax())
    assert averaged["top"][0]["weight"] == pytest.approx(float(alphas.mean(0).max()), abs=1e-6)
    assert len(adapter_out["mixture"]["layers"]) == len({n.split(".layers.")[1].split(".")[0]
                                                         for n in model.mixer.module_names})


def test_explain_writes_nothing_and_changes_no_score(world: World, explaining: LiveServer) -> None:
    user = world.users[4]
    first = post(explaining, "/v1/score", {"user_id": user, "candidates": CANDIDATES})
    assert first["score_source"] == "fused" and not first["degraded"], first
    before = settled_state(world.prefix)
    version = explaining.app.state.scorer.model_version
    other = world.users[5]  # never scored: nothing stored for it may appear either
    for who in (user, other, user):
        assert explain(explaining, who)["llm_computed"] is True
    time.sleep(1.0)  # room for any write off the request path to land
    assert settled_state(world.prefix) == before
    assert explaining.app.state.scorer.model_version == version
    again = post(explaining, "/v1/score", {"user_id": user, "candidates": CANDIDATES})
    assert again["scores"] == first["scores"] and again["model_version"] == first["model_version"]


def test_explain_waits_in_the_engine_queue_and_gives_up_at_its_deadline(world: World, explaining: LiveServer) -> None:
    scheduler = explaining.app.state.scorer.scheduler
    # The engine busy with request work for 3 s that admission does not see coming (predicted 0 ms).
    busy = scheduler.submit(lambda interrupted: time.sleep(3.0), 0.0)
    try:
        with ThreadPoolExecutor(1) as pool:
            start = time.perf_counter()
            first = pool.submit(explain, explaining, world.users[6], deadline_ms=800)
            wait_for(lambda: explaining.app.state.explainer._inflight == 1, 5.0, "the first explanation")
            with explaining.client() as http:  # one explanation at a time (RECLORA_EXPLAIN_MAX_INFLIGHT)
                second = http.post("/v1/explain", json={"user_id": world.users[7], "candidates": CANDIDATES})
            assert second.status_code == 429 and second.json()["error"]["code"] == "overloaded", second.text
            body = first.result(10)
            elapsed = time.perf_counter() - start
    finally:
        busy.result(10)
    assert body["llm_computed"] is False and body["llm_reason"] == "llm_timeout", body
    assert body["degraded_reasons"] == ["llm_timeout"]
    assert elapsed < 2.5  # answered at its deadline, not after the engine's work
    assert all(c["llm_score"] is None and c["fused_score"] is None for c in body["candidates"])
    assert all(c["served_score"] == c["crm_score"] and c["history"] for c in body["candidates"])

    body = explain(explaining, world.users[6], deadline_ms=1)
    assert body["llm_computed"] is False and body["llm_reason"] == "deadline", body


def test_explain_is_404_when_disabled(live: LiveServer) -> None:
    with live.client() as http:
        response = http.post("/v1/explain", json={"user_id": "1", "candidates": CANDIDATES})
    assert response.status_code == 404 and set(response.json()) == {"error"}


@pytest.fixture(scope="module")
def serves_crm(world: World, tmp_path_factory) -> Iterator[LiveServer]:
    """A version whose export decided ``serve: crm`` (``export_serving_crm``)."""
    root = tmp_path_factory.mktemp("explain-serves-crm")
    store = root / "store"
    export_serving_crm(world, root, store, SERVES_CRM)
    server = LiveServer.start(world.settings(model_store=store, active_version=SERVES_CRM, explain_enabled=True))
    yield server
    server.stop()


def test_a_version_serving_its_crm_still_has_its_llm_explained(world: World, serves_crm: LiveServer) -> None:
    user = world.users[2]
    scored = post(serves_crm, "/v1/score", {"user_id": user, "candidates": CANDIDATES})
    assert scored["score_source"] == "crm" and all(s["llm_score"] is None for s in scored["scores"])
    body = explain(serves_crm, user)
    assert body["score_source"] == "crm" and body["llm_computed"] is True, body
    for candidate, served in zip(body["candidates"], scored["scores"]):
        assert 0.0 < candidate["llm_score"] < 1.0 and candidate["fused_score"] is not None
        assert candidate["served_score"] == pytest.approx(served["score"], abs=1e-9)
        assert candidate["crm_score"] == pytest.approx(served["crm_score"], abs=1e-9)
