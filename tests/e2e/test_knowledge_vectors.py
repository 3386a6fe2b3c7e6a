"""User knowledge vectors served end to end: a knowledge CRM (trained on planted knowledge of the
shared world, exported with the world's LoRA) behind real HTTP, its users' vectors loaded into the
real Redis by ``reclora load-histories --knowledge``; requests read a user's vector in the history's
round trip (or the CRM's default, counted by why), and every ``EVERY`` events a background job
regenerates the vector with the tiny Llama and the real MiniLM encoder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from tests.e2e.e2e_support import REDIS_URL, LiveServer, World, metric_value, wait_for
from tests.knowledge_support import planted_vectors, write_knowledge
from tests.redis_support import scratch_prefix
from typer.testing import CliRunner

from service.history import HistorySettings, HistoryStore, KnowledgeRecord, UserHistory, knowledge_key
from service.knowledge.encode import MINILM
from service.knowledge.prompts import knowledge_prompts_for
from service.model import LoadedModel, load_model
from service.scoring.stages import UserHistoryView, run_crm

VERSION, CRM_ONLY = "e2e-knowledge", "e2e-knowledge-crm"
EVERY = 4  # events between refreshes
MAX_NEW_TOKENS = 8
PENALTY = 1.3  # the offline texts' repetition penalty, which a refresh decodes with too
CANDIDATES = [2, 13, 29, 64]


@dataclass
class KnowledgeWorld:
    store: Path
    knowledge_dir: Path
    prefix: str
    model: LoadedModel


@pytest.fixture(scope="module")
def kworld(world: World, tmp_path_factory) -> Iterator[KnowledgeWorld]:
    """A knowledge bundle (and a CRM-only one) of the world, and the users' vectors in Redis."""
    from training.cli import app
    from training.crm.checkpoint import save_checkpoint
    from training.crm.knowledge import load_knowledge
    from training.crm.train import TrainConfig, train_crm
    from training.export.crm_bundle import export_crm_bundle
    from training.knowledge.build import cutoff_timestamp
    from training.llm.fusion_fit import FusionOptions

    root = tmp_path_factory.mktemp("knowledge-world")
    data = world.data
    prompts = knowledge_prompts_for(data.meta, max_behaviours=10)
    directory = write_knowledge(root / "knowledge", *planted_vectors(data, dim=384, seed=2), encoder=MINILM,
                                cutoff_timestamp=cutoff_timestamp(data), max_new_tokens=MAX_NEW_TOKENS,
                                prompts=prompts.model_dump(), generated_at=time.time() - 3600,
                                generator={"decoding": "greedy", "repetition_penalty": PENALTY})
    embeddings = np.load(world.data_dir / "embeddings.npy")
    trained = train_crm(data, embeddings, TrainConfig(epochs=1, batch_size=256, progress=False, model=dict(
        emb_dim=16, l_crm=20, l_recent=20, mlp_hidden=[64, 32])), load_knowledge(directory, data))
    crm_dir = save_checkpoint(trained, root / "crm")
    store = root / "model_store"
    bundle = export_crm_bundle(world.data_dir, crm_dir, store, VERSION, description="e2e knowledge",
                               llm_dir=world.root / "lora", base_model=world.base_dir, llm_report=world.root / "report",
                               fusion=FusionOptions(serve="fused", samples=10))
    export_crm_bundle(world.data_dir, crm_dir, store, CRM_ONLY, description="e2e knowledge, CRM only")
    with scratch_prefix("e2e-knowledge") as prefix:
        result = CliRunner().invoke(app, ["load-histories", "--data", str(world.data_dir), "--redis-url", REDIS_URL,
                                          "--prefix", prefix, "--knowledge", str(directory)])
        assert result.exit_code == 0, result.output
        yield KnowledgeWorld(store, directory, prefix, load_model(bundle))


@pytest.fixture(scope="module")
def live(world: World, kworld: KnowledgeWorld) -> Iterator[LiveServer]:
    server = LiveServer.start(world.settings(model_store=kworld.store, active_version=VERSION,
                                             redis_prefix=kworld.prefix, knowledge_refresh_events=EVERY,
                                             torch_dtype="float32"))
    yield server
    server.stop()


class Store:
    """The world's knowledge keys through the service's own store class."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _run(self, fn):
        async def go():
            store = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=self.prefix))
            try:
                return await fn(store)
            finally:
                await store.aclose()

        return asyncio.run(go())

    def read(self, user: str) -> tuple[UserHistory, int]:
        return self._run(lambda s: s.read_with_count(user))

    def put(self, user: str, record: KnowledgeRecord) -> bool:
        return self._run(lambda s: s.put_knowledge(user, record))


def crm_scores(http, user: str) -> tuple[np.ndarray, dict]:
    response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == VERSION and body["degraded"] is False, body
    return np.asarray([s["crm_score"] for s in body["scores"]]), body


def expected_crm(model: LoadedModel, history: UserHistory, vector: np.ndarray | None) -> np.ndarray:
    view = UserHistoryView.from_raw(model, history.items, history.ratings, history.profile, vector)
    return run_crm(model, view, model.catalog.to_dense(CANDIDATES)).scores


def outcomes(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {o: metric_value(text, "reclora_user_knowledge_total", {"outcome": o})
            for o in ("vector", "default_missing", "default_mismatch", "default_malformed")}


def test_load_histories_wrote_each_users_vector_counting_events_before_the_cutoff(world, kworld) -> None:
    from training.crm.knowledge import load_knowledge
    from training.knowledge.build import cutoff_timestamp

    arrays = load_knowledge(kworld.knowledge_dir, world.data)
    cutoff = cutoff_timestamp(world.data)
    store = Store(kworld.prefix)
    raw_to_idx = dict(zip(world.data.users["user"].astype(str), world.data.users["user_idx"]))
    for user in world.users[:8]:
        history, count = store.read(user)
        _, _, stamps, _ = world.histories[user]
        assert count == len(stamps)
        idx = raw_to_idx[user]
        if not arrays.user_has[idx]:
            assert history.knowledge is None
            continue
        assert history.knowledge.events_at == int((stamps < cutoff).sum()) and history.knowledge.encoder == MINILM
        np.testing.assert_array_equal(history.knowledge.vector, arrays.user_vectors[idx])


def test_requests_read_the_users_vector_or_the_default_and_say_why(live, kworld, world) -> None:
    model, store = kworld.model, Store(kworld.prefix)
    user = next(u for u in world.users[2:] if store.read(u)[0].knowledge is not None)
    history, count = store.read(user)
    loaded = history.knowledge
    other = KnowledgeRecord(-loaded.vector, MINILM, count, time.time())
    with live.client() as http:
        before = outcomes(http)
        with_loaded, _ = crm_scores(http, user)
        np.testing.assert_allclose(with_loaded, expected_crm(model, history, loaded.vector), atol=1e-5)
        assert store.put(user, other)
        with_other, _ = crm_scores(http, user)
        np.testing.assert_allclose(with_other, expected_crm(model, history, other.vector), atol=1e-5)
        assert np.abs(with_other - with_loaded).max() > 1e-4  # the vector changes the score
        default = expected_crm(model, history, None)

        client = redis.Redis.from_url(REDIS_URL)
        client.delete(knowledge_key(kworld.prefix, user))
        missing, _ = crm_scores(http, user)
        assert store.put(user, KnowledgeRecord(loaded.vector[:100], "another-encoder", count, time.time()))
        mismatch, _ = crm_scores(http, user)
        client.hset(knowledge_key(kworld.prefix, user), "vector", b"\x00" * 7)
        malformed, _ = crm_scores(http, user)
        client.close()
        for scores in (missing, mismatch, malformed):
            np.testing.assert_allclose(scores, default, atol=1e-5)
        after = outcomes(http)
        ages = metric_value(http.get("/metrics").text, "reclora_user_knowledge_age_seconds_count")
    assert {k: after[k] - before[k] for k in after} == {"vector": 2, "default_missing": 1, "default_mismatch": 1,
                                                        "default_malformed": 1}
    assert ages >= 2


def test_the_nth_event_refreshes_the_vector_with_the_base_llm(live, kworld, world) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.knowledge.encode import load_encoder
    from service.knowledge.generate import generate_greedy
    from service.scoring.user_knowledge import BaseLLMKnowledge

    store = Store(kworld.prefix)
    user = world.users[5]
    history, count = store.read(user)
    start = KnowledgeRecord(np.full(384, 0.05, np.float32), MINILM, count, time.time() - 7 * 86_400)
    assert store.put(user, start)  # up to date: the next EVERY events make it due
    scheduler = live.app.state.scorer.scheduler
    latest = int(history.timestamps[-1])
    items = [int(i) for i in world.data.items["item"][:EVERY]]

    def refresh_counts(http) -> dict[str, float]:
        text = http.get("/metrics").text
        counts = {o: metric_value(text, "reclora_knowledge_refresh_total", {"outcome": o})
                  for o in ("refreshed", "failed", "unavailable", "superseded")}
        counts["scored"] = metric_value(text, "reclora_background_jobs_total", {"outcome": "scored"})
        return counts

    with live.client() as http:
        before = refresh_counts(http)
        for i, item in enumerate(items[:-1]):
            r = http.post("/v1/events", json={"user_id": user, "events": [
                {"item_id": item, "rating": 5.0, "timestamp": latest + 10 + i}]})
            assert r.status_code == 200, r.text
            assert scheduler.depth()[1] == 0  # no job queued
        time.sleep(0.5)
        unchanged = store.read(user)[0].knowledge
        assert unchanged.events_at == count and unchanged.generated_at == start.generated_at
        assert refresh_counts(http) == before

        r = http.post("/v1/events", json={"user_id": user, "events": [
            {"item_id": items[-1], "rating": 4.0, "timestamp": latest + 100}]})
        assert r.status_code == 200, r.text
        wait_for(lambda: store.read(user)[0].knowledge.events_at == count + EVERY, 120.0, "the refreshed vector",
                 interval=0.5)
        after = refresh_counts(http)
        _, body = crm_scores(http, user)  # served with the new vector
        age_fresh = metric_value(http.get("/metrics").text, "reclora_user_knowledge_age_seconds_bucket", {"le": "60.0"})
    assert after["refreshed"] - before["refreshed"] == 1 and after["scored"] - before["scored"] == 1
    assert after["failed"] == before["failed"] and after["unavailable"] == before["unavailable"]
    assert age_fresh >= 1
    history, count_now = store.read(user)
    fresh = history.knowledge
    assert count_now == count + EVERY and fresh.encoder == MINILM and fresh.dim == 384
    assert fresh.generated_at > time.time() - 120 and fresh.generated_at > start.generated_at
    assert abs(float(np.linalg.norm(fresh.vector)) - 1.0) < 1e-4  # MiniLM's normalized embedding
    assert not np.allclose(fresh.vector, start.vector)

    # The same text and vector from a fresh float32 copy of the base LLM and MiniLM.
    tokenizer = AutoTokenizer.from_pretrained(world.base_dir, local_files_only=True)
    llm = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype="float32", local_files_only=True).eval()
    system, prompt = BaseLLMKnowledge(None, None, None).prompt(kworld.model, history)
    text = generate_greedy(llm, tokenizer, [prompt], system=system, max_new_tokens=MAX_NEW_TOKENS,
                           repetition_penalty=PENALTY)[0].text
    want = load_encoder(MINILM).encode([text])[0]
    assert float(np.dot(want, fresh.vector)) > 0.999


def test_a_gateway_without_a_base_llm_counts_due_refreshes_as_unavailable(world, kworld) -> None:
    store = Store(kworld.prefix)
    user = world.users[7]
    history, count = store.read(user)
    start = KnowledgeRecord(np.full(384, 0.05, np.float32), MINILM, count, time.time())
    assert store.put(user, start)
    server = LiveServer.start(world.settings(model_store=kworld.store, active_version=CRM_ONLY,
                                             redis_prefix=kworld.prefix, knowledge_refresh_events=EVERY))
    try:
        with server.client() as http:
            latest = int(history.timestamps[-1])
            r = http.post("/v1/events", json={"user_id": user, "events": [
                {"item_id": int(world.data.items["item"][i]), "rating": 3.0, "timestamp": latest + i}
                for i in range(EVERY)]})
            assert r.status_code == 200, r.text
            text = http.get("/metrics").text
            response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
            assert response.status_code == 200 and response.json()["model_version"] == CRM_ONLY
    finally:
        server.stop()
    assert metric_value(text, "reclora_knowledge_refresh_total", {"outcome": "unavailable"}) == 1
    assert metric_value(text, "reclora_knowledge_refresh_total", {"outcome": "refreshed"}) == 0
    assert store.read(user)[0].knowledge.generated_at == start.generated_at
