"""The wiring: settings -> the production runtime, each part built once and shared where it must be."""

from __future__ import annotations

import hashlib
import shutil
import threading

import faiss
import pytest
import torch

from tests.redis_support import REDIS_URL
from service.api.wiring import build_adapter_cache, build_runtime
from service.engine.base import UserAdapter
from service.engine.torch_engine import TorchEngine
from service.history import HistorySettings, HistoryStore
from service.metrics import Metrics
from service.registry.manager import ModelManager
from service.scoring.pipeline import ScoringPipeline

ADMIN_DIGEST = hashlib.sha256(b"wiring-token").hexdigest()


def history_for(world) -> HistoryStore:
    return HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=world.prefix))


def test_a_pinned_gateway_gets_a_pipeline_and_no_registry(world):
    settings = world.settings()
    metrics = Metrics(process=False)
    runtime = build_runtime(settings, metrics, history_for(world))
    try:
        pipeline = runtime.scorer
        assert isinstance(pipeline, ScoringPipeline) and isinstance(pipeline.engine, TorchEngine)
        assert pipeline.model_version == world.version
        assert pipeline.holder.snapshot().builder is not None  # a bundle with an LLM part gets prompts
        assert runtime.models is None  # pinned version, no admin API: nothing to manage
        assert runtime.replica_health is None  # the embedded engine has no replicas
        assert pipeline.settings.default_deadline_ms == settings.requests.default_deadline_ms
        assert pipeline.settings.llm_min_ms == settings.requests.llm_min_ms
    finally:
        runtime.scorer.close()


def test_only_the_engine_thread_computes_with_intra_op_threads(world):
    """The engine's thread gets the configured count; the CRM's and the text side's threads (torch
    and faiss), and threads started later, compute on one."""
    runtime = build_runtime(world.settings(torch_threads=2), Metrics(process=False), history_for(world))
    try:
        pipeline = runtime.scorer
        assert pipeline.scheduler.submit(lambda interrupted: torch.get_num_threads(), 1.0).result(10) == 2
        assert pipeline._crm_pool.submit(torch.get_num_threads).result(10) == 1
        assert pipeline._text_pool.submit(torch.get_num_threads).result(10) == 1
        assert pipeline._text_pool.submit(faiss.omp_get_max_threads).result(10) == 1
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join(10)
        assert later == [1]
    finally:
        runtime.scorer.close()


def test_beside_the_embedded_engine_the_event_loop_takes_the_configured_nice_value(world):
    """The lifespan applies it to its event loop thread (tests/e2e/test_thread_priority.py)."""
    for nice in (0, 4):
        runtime = build_runtime(world.settings(gateway_threads_nice=nice), Metrics(process=False), history_for(world))
        try:
            assert isinstance(runtime.scorer.engine, TorchEngine) and runtime.threads_nice == nice
        finally:
            runtime.scorer.close()


def admin_settings(world, tmp_path):
    """An administering gateway on a store of its own (it records activations there)."""
    shutil.copytree(world.bundle_dir, tmp_path / "store" / world.version)
    return world.settings(model_store=tmp_path / "store", admin_enabled=True, admin_token_sha256=[ADMIN_DIGEST])


def test_the_registry_shares_the_pipeline_parts(world, tmp_path):
    settings = admin_settings(world, tmp_path)
    runtime = build_runtime(settings, Metrics(process=False), history_for(world))
    try:
        pipeline, models = runtime.scorer, runtime.models
        assert isinstance(models, ModelManager)
        assert models.holder is pipeline.holder and models.engine is pipeline.engine and models.cache is pipeline.adapters
        assert models.active == world.version and models.history()[-1]["version"] == world.version
        assert models.spec is not None and models.spec.yes_id == pipeline.holder.snapshot().builder.yes_id
    finally:
        runtime.scorer.close()


def test_a_follower_gets_a_registry_without_writing_the_store(world):
    settings = world.settings(active_version=None, model_poll_s=5.0)
    assert settings.model.follows_store
    before = sorted(p.name for p in world.store.iterdir())
    runtime = build_runtime(settings, Metrics(process=False), history_for(world))
    try:
        assert isinstance(runtime.models, ModelManager)
    finally:
        runtime.scorer.close()
    assert sorted(p.name for p in world.store.iterdir()) == before  # no activation recorded, nothing cleaned


def test_a_registry_that_fails_to_start_closes_the_pipeline(world, tmp_path, monkeypatch):
    closed = []
    monkeypatch.setattr(ScoringPipeline, "close", lambda self: closed.append(self))
    monkeypatch.setattr("service.api.wiring.build_manager",
                        lambda *args: (_ for _ in ()).throw(OSError("store not writable")))
    settings = admin_settings(world, tmp_path)
    with pytest.raises(RuntimeError, match="model registry: OSError: store not writable"):
        build_runtime(settings, Metrics(process=False), history_for(world))
    assert len(closed) == 1


def test_the_adapter_cache_reports_its_size(world):
    metrics = Metrics(process=False)
    assert build_adapter_cache(world.settings(), metrics) is None  # the embedded engine mixes in its forward
    cache = build_adapter_cache(world.settings(engine="vllm", vllm_url="http://127.0.0.1:9"), metrics)
    weights = {"q_proj": (torch.zeros(8, 2), torch.zeros(2, 8))}
    adapter = UserAdapter("u@v#0", weights, 1.0, user_id="u")
    cache.get_or_build("u", "v", torch.ones(3), lambda alphas: adapter)

    def gauge() -> float:
        return metrics.registry.get_sample_value("reclora_adapter_cache_bytes")

    assert gauge() == cache.nbytes == adapter.nbytes > 0
    cache.get_or_build("u", "v", torch.ones(3), lambda alphas: adapter)  # a hit: nothing changes
    assert metrics.registry.get_sample_value("reclora_adapter_cache_hits_total") == 1
    cache.drop_version("v")
    assert gauge() == 0


@pytest.mark.parametrize(("engine", "mode", "prototypes"), [
    ("torch", "auto", False), ("vllm", "auto", True), ("torch", "prototypes", True), ("vllm", "exact", False)])
def test_auto_serves_prototypes_on_vllm_only(world, engine, mode, prototypes):
    settings = world.settings(engine=engine, adapter_mode=mode, vllm_url="http://127.0.0.1:9")
    assert settings.model.serves_prototypes is prototypes
