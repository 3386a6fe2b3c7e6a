"""Build the scoring pipeline from settings: active bundle, base LLM, engine, adapter cache."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from service.config import Settings
from service.llm.precision import resolve_dtype
from service.llm.prompt import PromptBuilder
from service.metrics import Metrics
from service.personalization.adapter_cache import AdapterCache, CacheEvents
from service.registry.store import ModelStore
from service.runtime.model import LoadedModel, load_model
from service.scoring.pipeline import ModelHolder, ScoringPipeline

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


def build_scorer(settings: Settings, metrics: Metrics, *, history) -> ScoringPipeline:
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
    cache = AdapterCache(settings.adapter_cache_bytes, settings.adapter_drift_tol, CacheEvents(
        hit=metrics.adapter_cache_hits.inc, miss=metrics.adapter_cache_misses.inc,
        evict=metrics.adapter_cache_evictions.inc))
    log.info("model %s loaded (llm: %s)", version, "yes" if engine else "no")
    return ScoringPipeline(
        history=history, holder=ModelHolder(model, builder), engine=engine, cache=cache,
        default_deadline_ms=settings.default_deadline_ms, history_budget_ms=settings.history_budget_ms,
        llm_min_ms=settings.llm_min_ms, observe_stage=metrics.observe_stage, observe_degraded=metrics.observe_degraded)
