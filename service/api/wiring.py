"""The one place that knows the concrete classes: settings -> history store, model, engine,
adapter cache, served-score log, pipeline, model registry with the canary's guard rails, online
evaluation, the nearline knowledge refresh -> the app.

Everything else receives its parts through constructor arguments; ``create_app`` is what
``python -m service.api`` serves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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
from service.registry.guard import CanaryGuard, GuardConfig
from service.registry.manager import ModelManager, RegistryEvents
from service.registry.store import ModelStore
from service.registry.validation import BaseModelSpec
from service.nearline.knowledge_refresh import KnowledgeRefresher, RefreshEvents
from service.nearline.score_cache import LLMScoreCache
from service.nearline.served_log import ServedLog, ServedLogEvents
from service.scoring.contracts import ServedOutcome, VersionMetrics
from service.scoring.engine_scheduler import EngineScheduler, SchedulerEvents
from service.scoring.online_eval import OnlineEvaluator, OnlineEvents
from service.scoring.pipeline import ScoringEvents, ScoringPipeline
from service.scoring.user_knowledge import BaseLLMKnowledge, knowledge_target

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

    from service.engine.torch_engine import PACE_STALE_S, TorchEngine

    builder = build_prompt_builder(settings, model)
    dtype = resolve_dtype(settings.torch_dtype, settings.torch_device)
    llm = AutoModelForCausalLM.from_pretrained(settings.base_model_dir, dtype=dtype, local_files_only=True)
    engine = TorchEngine(llm.to(settings.torch_device), yes_id=builder.yes_id, no_id=builder.no_id,
                         target_modules=model.lora_config.target_modules, max_batch=settings.torch_max_batch,
                         min_saving=settings.torch_min_shared_tokens,
                         native_kernels=settings.torch_native_kernels,
                         # Background forwards keep the pace measured when they run (see expected_ms).
                         pace_max_age_s=None if settings.llm_score_cache else PACE_STALE_S)
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
    scores = None
    # Also without an engine: a canary's shadow scoring is background work on its thread.
    scheduler = EngineScheduler(
        max_background=settings.background_max_jobs, background_max_age_s=settings.background_max_age_s,
        events=SchedulerEvents(abandoned=metrics.llm_abandoned.inc, expired=metrics.llm_expired.inc,
                               background_done=lambda outcome: metrics.background_jobs.labels(outcome).inc(),
                               depth=metrics.observe_engine_queue))
    if engine is not None and settings.llm_score_cache:
        scores = LLMScoreCache(history.client, prefix=settings.redis_prefix, ttl_s=settings.llm_score_cache_ttl_s)
    events = ScoringEvents(
        stage=metrics.observe_stage, degraded=metrics.observe_degraded,
        admission=lambda outcome: metrics.llm_admissions.labels(outcome).inc(),
        candidates=lambda source, n: metrics.candidates.labels(source).inc(n),
        score_cache=lambda outcome, n: metrics.score_cache.labels(outcome).inc(n),
        shadow=lambda outcome: metrics.shadow_requests.labels(outcome).inc(), knowledge=metrics.observe_knowledge)
    return ScoringPipeline(
        history=history, holder=ModelHolder(model, builder), engine=engine, cache=build_adapter_cache(settings, metrics),
        default_deadline_ms=settings.default_deadline_ms, history_budget_ms=settings.history_budget_ms,
        llm_min_ms=settings.llm_min_ms, scheduler=scheduler, scores=scores,
        score_cache_budget_ms=settings.llm_score_cache_budget_ms, max_cpu_queue=settings.cpu_queue_limit,
        queue_aware=settings.llm_admission == "queue", events=events,
        served_log=build_served_log(settings, metrics, history))


def build_served_log(settings: Settings, metrics: Metrics, history: HistoryStore) -> ServedLog | None:
    """The served-score log on the history store's Redis (None when switched off)."""
    if not settings.served_log:
        return None
    return ServedLog(history.client, prefix=settings.redis_prefix, max_len=settings.served_log_max_len,
                     max_age_s=settings.served_log_max_age_s, label_window_s=settings.online_label_window_s,
                     labels_max_len=settings.online_max_labels, labels_max_age_s=settings.online_window_s,
                     queue_size=settings.served_log_queue, events=ServedLogEvents(
                         written=lambda n: metrics.served_log.labels("written").inc(n),
                         dropped=lambda n: metrics.served_log.labels("dropped").inc(n),
                         failed=lambda n: metrics.served_log.labels("failed").inc(n)))


def build_knowledge_refresh(settings: Settings, metrics: Metrics, history: HistoryStore,
                            pipeline: ScoringPipeline) -> KnowledgeRefresher | None:
    """The nearline refresh of user knowledge vectors on the pipeline's engine scheduler (None when
    switched off). It generates with the embedded engine's base LLM; a gateway without one (no LLM
    part in the bundle, or the remote engine) only counts the refreshes that are due."""
    if settings.knowledge_refresh_events == 0:
        return None
    from service.engine.base import ForwardInterrupted
    from service.engine.torch_engine import TorchEngine

    holder, engine = pipeline.holder, pipeline.engine
    source = None
    if isinstance(engine, TorchEngine):

        def tokenizer():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(settings.base_model_dir, local_files_only=True)

        source = BaseLLMKnowledge(holder, engine.base_model, tokenizer)
    return KnowledgeRefresher(
        history, every=settings.knowledge_refresh_events, target=lambda: knowledge_target(holder.snapshot().model),
        source=source, submit=pipeline.scheduler.submit_background if pipeline.scheduler is not None else None,
        events=RefreshEvents(outcome=lambda outcome: metrics.knowledge_refresh.labels(outcome).inc()),
        retried=(ForwardInterrupted,))


def label_thresholds(settings: Settings, holder: ModelHolder) -> Callable[[str], float]:
    """label = rating > threshold, per version: the setting, else the version's ``dataset.json``
    (the threshold it was trained with), read once per version from the loaded bundle or the store."""
    known: dict[str, float] = {}

    def threshold_of(version: str) -> float:
        if settings.online_label_threshold is not None:
            return settings.online_label_threshold
        if version not in known:
            snapshot = holder.snapshot()
            loaded = {snapshot.version: snapshot.model}
            if snapshot.canary is not None:
                loaded[snapshot.canary.candidate.version] = snapshot.canary.candidate.model
            if version in loaded:
                dataset = loaded[version].bundle.load_json("dataset.json")
            else:
                dataset = json.loads((ModelStore(settings.model_store).path(version) / "dataset.json").read_text())
            known[version] = float(dataset["label_threshold"])
        return known[version]

    return threshold_of


def build_manager(settings: Settings, metrics: Metrics, pipeline: ScoringPipeline) -> ModelManager:
    """The registry of a running service over the pipeline's holder, engine and adapter cache."""
    builder = pipeline.holder.snapshot().builder
    spec = None
    if builder is not None:
        spec = BaseModelSpec.from_pretrained_config(settings.base_model_dir, yes_id=builder.yes_id, no_id=builder.no_id)

    def activated(kind: str, version: str) -> None:
        metrics.model_activations.labels(kind).inc()
        metrics.set_model_version(version)

    events = RegistryEvents(activated=activated, refused=lambda reason: metrics.model_refusals.labels(reason).inc(),
                            canary=metrics.set_canary, aborted=lambda rail: metrics.canary_aborts.labels(rail).inc())
    guard = CanaryGuard(GuardConfig(
        min_requests=settings.canary_min_requests, max_error_excess=settings.canary_max_error_excess,
        max_degraded_excess=settings.canary_max_degraded_excess, max_p99_excess_ms=settings.canary_max_p99_excess_ms,
        min_labels=settings.canary_min_labels, max_auc_drop=settings.canary_max_auc_drop),
        enabled=settings.canary_guard)
    manager = ModelManager(ModelStore(settings.model_store), pipeline.holder, pipeline.engine, pipeline.cache, spec,
                           max_rank=settings.max_lora_rank, max_upload_bytes=settings.admin_max_upload_bytes,
                           events=events, guard=guard)
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
    online = build_online(settings, metrics, pipeline, models)
    if models is not None:
        try:
            models.follow_canary()  # a restart resumes the canary the store records
        except Exception:
            log.exception("resuming the store's canary failed; serving the stable version")
    remote = settings.engine == "vllm" and pipeline.engine is not None  # a VLLMEngine: replicas to report
    return Runtime(scorer=pipeline, models=models, replica_health=pipeline.engine.replica_health if remote else None,
                   online=online, knowledge=build_knowledge_refresh(settings, metrics, history, pipeline))


def build_online(settings: Settings, metrics: Metrics, pipeline: ScoringPipeline,
                 models: ModelManager | None) -> OnlineEvaluator | None:
    """Per-answer outcomes to the canary metrics and guard; labels from events to the online
    metrics (gauges for the loaded versions) and the online AUC rail."""
    holder = pipeline.holder

    def served(version: str, outcome: ServedOutcome, ms: float) -> None:
        canary = holder.canary
        if canary is not None:
            metrics.canary_responses.labels("candidate" if version == canary.candidate.version else "stable",
                                            outcome).inc()
        if models is not None:
            models.observe_request(version, outcome, ms)

    pipeline.events.served = served
    if pipeline.served_log is None:
        return None

    def refreshed(by_version: dict[str, VersionMetrics]) -> None:
        snapshot = holder.snapshot()
        loaded = {snapshot.version} | ({snapshot.canary.candidate.version} if snapshot.canary else set())
        metrics.set_online(by_version, loaded)
        if models is not None:
            models.observe_online(by_version)

    return OnlineEvaluator(pipeline.served_log, threshold_of=label_thresholds(settings, holder),
                           window_s=settings.online_window_s, max_labels=settings.online_max_labels,
                           interval_s=settings.online_eval_interval_s, events=OnlineEvents(
                               labels=lambda outcome, n: metrics.online_labels.labels(outcome).inc(n),
                               metrics=refreshed))


def create_app(settings: Settings | None = None, **services) -> FastAPI:
    """The service app on the production runtime (``services``: a history store or metrics to use)."""
    return build_app(settings or get_settings(), runtime=build_runtime, **services)
