"""The one place that knows the concrete classes: settings -> history store, model, engine,
adapter cache, pipeline, model registry -> the app.

Everything else receives its parts through constructor arguments; ``create_app`` is what
``python -m service.api`` serves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from fastapi import FastAPI

from service.api.app import build_app
from service.api.lifecycle import Runtime
from service.config import Settings, get_settings
from service.history import HistoryStore
from service.llm.precision import resolve_dtype
from service.llm.prompt import PromptBuilder
from service.metrics import Metrics
from service.model import LoadedModel, ModelHolder, load_model
from service.personalization.adapter_cache import AdapterCache, CacheEvents
from service.registry.manager import ModelManager, RegistryEvents
from service.registry.store import ModelStore
from service.registry.validation import BaseModelSpec
from service.nearline.score_cache import LLMScoreCache
from service.scoring.engine_scheduler import EngineScheduler, SchedulerEvents
from service.scoring.pipeline import ScoringEvents, ScoringPipeline

log = logging.getLogger(__name__)


def active_version(store: Path, configured: str | None) -> str:
    """The configured version, else the store's ACTIVE pointer, else the newest bundle."""
    if configured:
        return configured
    models = ModelStore(store)
    versions = models.versions()
    version = models.pointer() or (versions[-1] if versions else None)
    if version is None:
        raise FileNotFoundError(f"no model bundle in {store}: export one with `reclora export`")
    return version


def build_prompt_builder(settings: Settings, model: LoadedModel) -> PromptBuilder:
    """Prompts of ``model``'s config on the base model's tokenizer, which every engine scores with."""
    from transformers import AutoTokenizer

    return PromptBuilder(AutoTokenizer.from_pretrained(settings.base_model_dir, local_files_only=True), model.prompt)


def build_torch_engine(settings: Settings, model: LoadedModel):
    """The embedded engine on the base LLM and the prompt builder for its tokenizer."""
    from transformers import AutoModelForCausalLM

    from service.engine.torch_engine import TorchEngine

    builder = build_prompt_builder(settings, model)
    dtype = resolve_dtype(settings.torch_dtype, settings.torch_device)
    llm = AutoModelForCausalLM.from_pretrained(settings.base_model_dir, dtype=dtype, local_files_only=True)
    engine = TorchEngine(llm.to(settings.torch_device), yes_id=builder.yes_id, no_id=builder.no_id,
                         target_modules=model.lora_config.target_modules, max_batch=settings.torch_max_batch,
                         min_saving=settings.torch_min_shared_tokens,
                         native_kernels=settings.torch_native_kernels)
    return engine, builder


def build_vllm_engine(settings: Settings, model: LoadedModel, metrics: Metrics):
    """The remote engine over the configured vLLM replicas, and the prompt builder for the base
    model's tokenizer (the servers serve the same base model directory, so ids agree)."""
    from service.engine.vllm.adapters import AdapterEvents, AdapterLifecycle, AdapterWriter
    from service.engine.vllm.client import VLLMClient
    from service.engine.vllm.engine import VLLMEngine
    from service.engine.vllm.routing import AffinityRouter

    builder = build_prompt_builder(settings, model)
    urls = [str(u).rstrip("/") for u in settings.vllm_urls]
    if settings.vllm_url is not None and str(settings.vllm_url).rstrip("/") not in urls:
        urls.append(str(settings.vllm_url).rstrip("/"))

    def loaded(replica: str, seconds: float) -> None:
        metrics.vllm_adapter_load_latency.labels(replica).observe(seconds)
        metrics.vllm_adapter_loads.labels(replica).inc()

    events = AdapterEvents(loaded=loaded, evicted=lambda replica: metrics.vllm_adapter_evictions.labels(replica).inc(),
                           resident=lambda replica, n: metrics.vllm_adapters_resident.labels(replica).set(n))
    writer = AdapterWriter(settings.vllm_adapter_dir, base_model=str(settings.base_model_dir),
                           server_root=settings.vllm_adapter_server_dir)
    lifecycle = AdapterLifecycle(writer, settings.vllm_max_adapters, load_timeout_s=settings.vllm_load_timeout_s,
                                 events=events)
    clients = [VLLMClient(u, connect_timeout_s=settings.vllm_connect_timeout_s,
                          max_connections=settings.vllm_max_connections) for u in urls]
    engine = VLLMEngine(clients, lifecycle, yes_id=builder.yes_id, no_id=builder.no_id,
                        router=AffinityRouter(urls, load_factor=settings.vllm_load_factor),
                        scoring_api=settings.vllm_scoring_api, request_timeout_s=settings.max_deadline_ms / 1000.0,
                        health_interval_s=settings.vllm_health_interval_s,
                        on_replica_up=lambda replica, up: metrics.vllm_replica_up.labels(replica).set(int(up)))
    return engine, builder


def build_adapter_cache(settings: Settings, metrics: Metrics) -> AdapterCache:
    return AdapterCache(settings.adapter_cache_bytes, settings.adapter_drift_tol, CacheEvents(
        hit=metrics.adapter_cache_hits.inc, miss=metrics.adapter_cache_misses.inc,
        evict=metrics.adapter_cache_evictions.inc, size=metrics.adapter_cache_bytes.set))


def build_pipeline(settings: Settings, metrics: Metrics, history: HistoryStore) -> ScoringPipeline:
    """The scoring pipeline on the active version: its model, the engine (when it has an LLM part),
    the adapter cache."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    version = active_version(settings.model_store, settings.active_version)
    model = load_model(settings.model_store / version)
    engine = builder = None
    if model.mixer is not None:
        if settings.engine == "vllm":
            engine, builder = build_vllm_engine(settings, model, metrics)
        else:
            engine, builder = build_torch_engine(settings, model)
    log.info("model %s loaded (llm: %s)", version, "yes" if engine else "no")
    scheduler = scores = None
    if engine is not None:
        scheduler = EngineScheduler(
            max_background=settings.background_max_jobs, background_max_age_s=settings.background_max_age_s,
            events=SchedulerEvents(abandoned=metrics.llm_abandoned.inc, expired=metrics.llm_expired.inc,
                                   background_done=lambda outcome: metrics.background_jobs.labels(outcome).inc(),
                                   depth=metrics.observe_engine_queue))
        if settings.llm_score_cache:
            scores = LLMScoreCache(history.client, prefix=settings.redis_prefix, ttl_s=settings.llm_score_cache_ttl_s)
    events = ScoringEvents(
        stage=metrics.observe_stage, degraded=metrics.observe_degraded,
        admission=lambda outcome: metrics.llm_admissions.labels(outcome).inc(),
        candidates=lambda source, n: metrics.candidates.labels(source).inc(n),
        score_cache=lambda outcome, n: metrics.score_cache.labels(outcome).inc(n))
    return ScoringPipeline(
        history=history, holder=ModelHolder(model, builder), engine=engine, cache=build_adapter_cache(settings, metrics),
        default_deadline_ms=settings.default_deadline_ms, history_budget_ms=settings.history_budget_ms,
        llm_min_ms=settings.llm_min_ms, scheduler=scheduler, scores=scores,
        score_cache_budget_ms=settings.llm_score_cache_budget_ms, max_cpu_queue=settings.cpu_queue_limit,
        queue_aware=settings.llm_admission == "queue", events=events)


def build_manager(settings: Settings, metrics: Metrics, pipeline: ScoringPipeline) -> ModelManager:
    """The registry of a running service over the pipeline's holder, engine and adapter cache."""
    builder = pipeline.holder.snapshot().builder
    spec = None
    if builder is not None:
        spec = BaseModelSpec.from_pretrained_config(settings.base_model_dir, yes_id=builder.yes_id, no_id=builder.no_id)

    def activated(kind: str, version: str) -> None:
        metrics.model_activations.labels(kind).inc()
        metrics.set_model_version(version)

    events = RegistryEvents(activated=activated, refused=lambda reason: metrics.model_refusals.labels(reason).inc())
    manager = ModelManager(ModelStore(settings.model_store), pipeline.holder, pipeline.engine, pipeline.cache, spec,
                           max_rank=settings.max_lora_rank, max_upload_bytes=settings.admin_max_upload_bytes,
                           events=events)
    if settings.admin_enabled:  # only a gateway that administers the store writes to it
        manager.clean_stale()
        manager.record_start()
    return manager


def build_runtime(settings: Settings, metrics: Metrics, history: HistoryStore) -> Runtime:
    """The production runtime: the pipeline, its registry when this gateway administers or follows
    the store, and the remote replicas' health when the engine has replicas."""
    pipeline = build_pipeline(settings, metrics, history)
    models = None
    if settings.admin_enabled or settings.follows_store:
        try:
            models = build_manager(settings, metrics, pipeline)
        except Exception as exc:
            pipeline.close()
            raise RuntimeError(f"model registry: {type(exc).__name__}: {exc}") from exc
    remote = settings.engine == "vllm" and pipeline.engine is not None  # a VLLMEngine: replicas to report
    return Runtime(scorer=pipeline, models=models, replica_health=pipeline.engine.replica_health if remote else None)


def create_app(settings: Settings | None = None, **services) -> FastAPI:
    """The service app on the production runtime (``services``: a history store or metrics to use)."""
    return build_app(settings or get_settings(), runtime=build_runtime, **services)
