"""The one place that knows the concrete classes: settings -> history store, model, engine,
adapter cache, served-score log, pipeline, model registry with the canary's guard rails, online
evaluation, the nearline knowledge refresh, the explainer -> the app.

Everything else receives its parts through constructor arguments: each its group of the settings
whole, and ``Metrics`` as the ``Telemetry`` it reports its outcomes through; ``create_app`` is
what ``python -m service.api`` serves.
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
from service.personalization.adapter_cache import AdapterCache
from service.registry.guard import CanaryGuard
from service.registry.manager import ModelManager
from service.registry.store import ModelStore
from service.registry.validation import BaseModelSpec, collab_engine_refusal
from service.nearline.knowledge_refresh import KnowledgeRefresher
from service.nearline.score_cache import LLMScoreCache
from service.nearline.served_log import ServedLog
from service.scoring.contracts import ServedOutcome, VersionMetrics
from service.scoring.engine_scheduler import EngineScheduler, set_thread_intra_op_threads
from service.scoring.explain import ScoreExplainer
from service.scoring.online_eval import OnlineEvaluator
from service.scoring.pipeline import ScoringPipeline, ServedFeed
from service.scoring.stages import prototype_adapters
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

    tokenizer = AutoTokenizer.from_pretrained(settings.model.base_model_dir, local_files_only=True)
    return PromptBuilder(tokenizer, model.prompt)


def build_torch_engine(settings: Settings, model: LoadedModel):
    """The embedded engine on the base LLM and the prompt builder for its tokenizer."""
    from transformers import AutoModelForCausalLM

    from service.engine.torch_engine import PACE_STALE_S, TorchEngine

    builder = build_prompt_builder(settings, model)
    torch_settings = settings.torch
    dtype = resolve_dtype(torch_settings.torch_dtype, torch_settings.torch_device)
    llm = AutoModelForCausalLM.from_pretrained(settings.model.base_model_dir, dtype=dtype, local_files_only=True)
    engine = TorchEngine(llm.to(torch_settings.torch_device), torch_settings, yes_id=builder.yes_id,
                         no_id=builder.no_id, target_modules=model.lora_config.target_modules,
                         # Background forwards keep the pace measured when they run (see expected_ms).
                         pace_max_age_s=None if settings.score_cache.llm_score_cache else PACE_STALE_S)
    return engine, builder


def build_vllm_engine(settings: Settings, model: LoadedModel, metrics: Metrics):
    """The remote engine over the configured vLLM replicas, and the prompt builder for the base
    model's tokenizer (the servers serve the same base model directory, so ids agree)."""
    from service.engine.vllm.adapters import AdapterLifecycle
    from service.engine.vllm.engine import VLLMEngine

    builder = build_prompt_builder(settings, model)
    lifecycle = AdapterLifecycle.from_settings(settings.vllm, base_model=str(settings.model.base_model_dir),
                                               telemetry=metrics)
    engine = VLLMEngine.from_settings(settings.vllm, lifecycle, yes_id=builder.yes_id, no_id=builder.no_id,
                                      request_timeout_s=settings.requests.max_deadline_ms / 1000.0, telemetry=metrics)
    engine.preload(prototype_adapters(model))  # the version's prototypes on every replica before it serves
    return engine, builder


def build_adapter_cache(settings: Settings, metrics: Metrics) -> AdapterCache | None:
    """Materialized user adapters for an engine that takes them (vLLM); the embedded engine mixes
    each user's adapter in its forward and needs none."""
    return AdapterCache(settings.adapter_cache, metrics) if settings.model.engine == "vllm" else None


def build_pipeline(settings: Settings, metrics: Metrics, history: HistoryStore,
                   on_served: ServedFeed | None = None) -> ScoringPipeline:
    """The scoring pipeline on the active version: its model, the engine (when it has an LLM part),
    the adapter cache; ``on_served`` receives every answer's outcome.

    The engine's thread alone computes with torch intra-op threads (``torch_threads``, else torch's
    default); everything else computes on one: loading here, the CRM, retrieval and prompts, and
    threads started later (the registry's loads and smoke tests), so the engine's OpenMP workers
    wait for its parallel regions as in any process with one team (``docs/ENGINE.md``, "Threads").
    This sets the count of the calling thread, and the one threads started later begin with, to
    one."""
    engine_threads = settings.torch.torch_threads or torch.get_num_threads()
    set_thread_intra_op_threads(1)
    version = active_version(settings.model.model_store, settings.model.active_version)
    model = load_model(settings.model.model_store / version, prototypes=settings.model.serves_prototypes)
    engine = builder = None
    if model.mixer is not None:
        if settings.model.engine == "vllm":
            engine, builder = build_vllm_engine(settings, model, metrics)
        else:
            engine, builder = build_torch_engine(settings, model)
        refusal = collab_engine_refusal(model, engine)  # as the registry refuses such a push
        if refusal is not None:
            raise ValueError(f"version {version}: {refusal}")
    log.info("model %s loaded (llm: %s)", version, "yes" if engine else "no")
    score_cache = None
    if engine is not None and settings.score_cache.llm_score_cache:
        score_cache = LLMScoreCache(history.client, settings.score_cache, prefix=settings.history.redis_prefix)
    return ScoringPipeline(
        history=history, holder=ModelHolder(model, builder), engine=engine,
        adapters=build_adapter_cache(settings, metrics), settings=settings.requests,
        # Also without an engine: a canary's shadow scoring is background work on its thread.
        scheduler=EngineScheduler(settings.background, telemetry=metrics,
                                  intra_op_threads=engine_threads if settings.model.engine == "torch" else None),
        score_cache=score_cache,
        served_log=build_served_log(settings, metrics, history), telemetry=metrics, on_served=on_served)


def build_served_log(settings: Settings, metrics: Metrics, history: HistoryStore) -> ServedLog | None:
    """The served-score log on the history store's Redis (None when switched off)."""
    if not settings.online.served_log:
        return None
    return ServedLog(history.client, settings.online, prefix=settings.history.redis_prefix, telemetry=metrics)


def build_knowledge_refresh(settings: Settings, metrics: Metrics, history: HistoryStore,
                            pipeline: ScoringPipeline) -> KnowledgeRefresher | None:
    """The nearline refresh of user knowledge vectors on the pipeline's engine scheduler (None when
    switched off). It generates with the embedded engine's base LLM; a gateway without one (no LLM
    part in the bundle, or the remote engine) only counts the refreshes that are due."""
    if settings.knowledge_refresh.knowledge_refresh_events == 0:
        return None
    from service.engine.base import ForwardInterrupted
    from service.engine.torch_engine import TorchEngine

    holder, engine = pipeline.holder, pipeline.engine
    source = None
    if isinstance(engine, TorchEngine):

        def tokenizer():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(settings.model.base_model_dir, local_files_only=True)

        source = BaseLLMKnowledge(holder, engine.base_model, tokenizer)
    return KnowledgeRefresher(
        history, settings.knowledge_refresh, target=lambda: knowledge_target(holder.snapshot().model),
        source=source, submit=pipeline.scheduler.submit_background if pipeline.scheduler is not None else None,
        telemetry=metrics, retried=(ForwardInterrupted,))


def label_thresholds(settings: Settings, holder: ModelHolder) -> Callable[[str], float]:
    """label = rating > threshold, per version: the setting, else the version's ``dataset.json``
    (the threshold it was trained with), read once per version from the loaded bundle or the store."""
    known: dict[str, float] = {}

    def threshold_of(version: str) -> float:
        if settings.online.online_label_threshold is not None:
            return settings.online.online_label_threshold
        if version not in known:
            snapshot = holder.snapshot()
            loaded = {snapshot.version: snapshot.model}
            if snapshot.canary is not None:
                loaded[snapshot.canary.candidate.version] = snapshot.canary.candidate.model
            if version in loaded:
                dataset = loaded[version].bundle.load_json("dataset.json")
            else:
                store = ModelStore(settings.model.model_store)
                dataset = json.loads((store.path(version) / "dataset.json").read_text())
            known[version] = float(dataset["label_threshold"])
        return known[version]

    return threshold_of


def build_manager(settings: Settings, metrics: Metrics, pipeline: ScoringPipeline) -> ModelManager:
    """The registry of a running service over the pipeline's holder, engine and adapter cache."""
    builder = pipeline.holder.snapshot().builder
    spec = None
    if builder is not None:
        spec = BaseModelSpec.from_pretrained_config(settings.model.base_model_dir, yes_id=builder.yes_id,
                                                    no_id=builder.no_id)
    manager = ModelManager(settings.model, settings.admin, pipeline.holder, pipeline.engine, pipeline.adapters, spec,
                           telemetry=metrics, guard=CanaryGuard(settings.canary))
    if settings.admin.admin_enabled:  # only a gateway that administers the store writes to it
        manager.clean_stale()
        manager.record_start()
    return manager


def build_runtime(settings: Settings, metrics: Metrics, history: HistoryStore) -> Runtime:
    """The production runtime: the pipeline, its registry when this gateway administers or follows
    the store (with the canary's guard rails fed by every answer), online evaluation, the nearline
    knowledge refresh, the explainer (when on), and the remote replicas' health when the engine has
    replicas."""
    models: ModelManager | None = None

    def served(version: str, outcome: ServedOutcome, ms: float) -> None:
        """Every answer's outcome: the canary's responses by side, and the registry's guard rails."""
        canary = pipeline.holder.canary
        if canary is not None:
            metrics.count(outcome, on="candidate" if version == canary.candidate.version else "stable")
        if models is not None:
            models.observe_request(version, outcome, ms)

    pipeline = build_pipeline(settings, metrics, history, on_served=served)
    if settings.admin.admin_enabled or settings.model.follows_store:
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
    remote = settings.model.engine == "vllm" and pipeline.engine is not None  # a VLLMEngine: replicas to report
    embedded = settings.model.engine == "torch" and pipeline.engine is not None  # its forwards share our CPUs
    return Runtime(scorer=pipeline, models=models, replica_health=pipeline.engine.replica_health if remote else None,
                   online=online, knowledge=build_knowledge_refresh(settings, metrics, history, pipeline),
                   explainer=build_explainer(settings, pipeline),
                   threads_nice=settings.torch.gateway_threads_nice if embedded else 0)


def build_explainer(settings: Settings, pipeline: ScoringPipeline) -> ScoreExplainer | None:
    """The explainer of /v1/explain on the pipeline's history, models, engine and engine scheduler
    (None when off)."""
    if not settings.explain.explain_enabled:
        return None
    return ScoreExplainer(history=pipeline.history, holder=pipeline.holder, engine=pipeline.engine,
                          scheduler=pipeline.scheduler, requests=settings.requests, settings=settings.explain)


def build_online(settings: Settings, metrics: Metrics, pipeline: ScoringPipeline,
                 models: ModelManager | None) -> OnlineEvaluator | None:
    """Labels from events to the online metrics (gauges for the loaded versions) and the canary's
    online AUC rail; None without a served-score log."""
    if pipeline.served_log is None:
        return None
    holder = pipeline.holder

    def refreshed(by_version: dict[str, VersionMetrics]) -> None:
        snapshot = holder.snapshot()
        loaded = {snapshot.version} | ({snapshot.canary.candidate.version} if snapshot.canary else set())
        metrics.set_online(by_version, loaded)
        if models is not None:
            models.observe_online(by_version)

    return OnlineEvaluator(pipeline.served_log, settings.online, threshold_of=label_thresholds(settings, holder),
                           telemetry=metrics, on_refresh=refreshed)


def create_app(settings: Settings | None = None, **services) -> FastAPI:
    """The service app on the production runtime (``services``: a history store or metrics to use)."""
    return build_app(settings or get_settings(), runtime=build_runtime, **services)
