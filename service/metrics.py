"""Prometheus metrics of the service, owned by one ``Metrics`` object per app.

``Metrics`` is the ``Telemetry`` every component reports through (``service.telemetry``): this
module alone maps each outcome enum to its counter and each quantity to its histogram or gauge,
and pre-creates every label set from the enums, so dashboards see zero-valued series from the
start. Each ``Metrics`` has its own ``CollectorRegistry`` (not the process-global one), so tests
and tools can build several apps in one process. Durations are recorded in seconds (Prometheus
base unit) with buckets from 0.5 ms to 10 s, the range of a scoring request. Labels are bounded
sets (route templates, stages, reasons, configured replicas, loaded versions): never user or
item ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import gc_collector, platform_collector, process_collector
from prometheus_client.exposition import choose_encoder

from service.engine.vllm.adapters import ReplicaAdapterOutcome
from service.nearline.knowledge_refresh import RefreshOutcome
from service.nearline.served_log import ServedLogOutcome
from service.personalization.adapter_cache import AdapterCacheOutcome
from service.registry.errors import ActivationKind, RefusalReason
from service.registry.guard import GuardRail
from service.scoring.contracts import (Admission, CandidateSource, DegradedReason, ScoreCacheOutcome, ServedOutcome,
                                       ShadowOutcome, Stage, VersionMetrics)
from service.scoring.engine_scheduler import BackgroundOutcome, RequestWorkOutcome
from service.scoring.online_eval import LabelOutcome
from service.scoring.user_knowledge import KnowledgeOutcome
from service.telemetry import Quantity

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = tuple(Stage)  # the stages of a score request (service.scoring.contracts)
DEGRADED_REASONS = tuple(DegradedReason)  # why an answer was degraded (service.scoring.contracts)
REFUSAL_REASONS = tuple(RefusalReason)  # why a model push or activation was refused (service.registry)
ACTIVATION_KINDS = tuple(ActivationKind)
SHED_ROUTES = ("/v1/score", "/v1/events")
CANARY_SIDES = ("stable", "candidate")
# Ages of served knowledge vectors: a minute to a year (offline vectors are as old as their bundle).
KNOWLEDGE_AGE_BUCKETS_S = (60.0, 600.0, 3600.0, 6 * 3600.0, 86_400.0, 3 * 86_400.0, 7 * 86_400.0, 30 * 86_400.0,
                           90 * 86_400.0, 365 * 86_400.0)


class Metrics:
    """The service's collectors; the scoring pipeline reports through ``observe_stage`` and
    ``observe_degraded``, the adapter cache through the ``adapter_cache_*`` collectors."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            process_collector.ProcessCollector(registry=r)
            platform_collector.PlatformCollector(registry=r)
            gc_collector.GCCollector(registry=r)
        self.request_latency = Histogram(
            "reclora_http_request_duration_seconds", "HTTP request latency by route template and status.",
            ["method", "route", "status"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.stage_latency = Histogram(
            "reclora_stage_duration_seconds", "Time spent per stage of a score request.",
            ["stage"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.degraded = Counter(
            "reclora_degraded_responses", "Score answers served degraded, by reason.", ["reason"], registry=r)
        self.adapter_cache_hits = Counter(
            "reclora_adapter_cache_hits", "User adapters served from the cache.", registry=r)
        self.adapter_cache_misses = Counter(
            "reclora_adapter_cache_misses", "User adapters materialized (absent or drifted).", registry=r)
        self.adapter_cache_evictions = Counter(
            "reclora_adapter_cache_evictions", "User adapters evicted to stay within the byte bound.", registry=r)
        self.adapter_cache_bytes = Gauge(
            "reclora_adapter_cache_bytes", "Bytes held by cached user adapters.", registry=r)
        self.events_appended = Counter(
            "reclora_events_appended", "Behaviour events appended to user histories.", registry=r)
        self.model = Info("reclora_model", "The model bundle version being served.", registry=r)
        # --- load: admission, shedding, the engine's queue, nearline LLM scores
        self.inflight = Gauge(
            "reclora_inflight_requests", "Requests being served now, by route (bounded routes only).", ["route"],
            registry=r)
        self.shed = Counter(
            "reclora_shed_responses", "Requests answered 429 at once because the route was at its bound.",
            ["route"], registry=r)
        self.llm_admissions = Counter(
            "reclora_llm_admissions", "What score requests' LLM stages decided for their uncached candidates.",
            ["outcome"], registry=r)
        self.llm_abandoned = Counter(
            "reclora_llm_abandoned_forwards", "LLM forwards started for a request and stopped at its deadline.",
            registry=r)
        self.llm_expired = Counter(
            "reclora_llm_expired_requests", "Request work that reached the engine after its deadline (not started).",
            registry=r)
        self.engine_queue_requests = Gauge(
            "reclora_engine_queue_requests", "Requests waiting for or running on the LLM engine.", registry=r)
        self.engine_queue_ms = Gauge(
            "reclora_engine_queue_predicted_ms", "Predicted milliseconds of request work queued on the LLM engine.",
            registry=r)
        self.background_queue = Gauge(
            "reclora_background_queue_jobs", "Background engine jobs waiting for an idle engine.", registry=r)
        self.background_jobs = Counter(
            "reclora_background_jobs", "Background engine jobs by outcome (scored, failed, dropped, expired).",
            ["outcome"], registry=r)
        self.score_cache = Counter(
            "reclora_llm_score_cache_lookups", "Candidates looked up in the LLM score cache, by outcome.",
            ["outcome"], registry=r)
        self.candidates = Counter(
            "reclora_candidates", "Scored candidates by where their LLM score came from (live, cached, none).",
            ["llm"], registry=r)
        # --- vLLM engine (labelled by replica URL: a bounded, configured set)
        self.vllm_adapter_load_latency = Histogram(
            "reclora_vllm_adapter_load_seconds", "Time to register a user adapter on a vLLM replica.",
            ["replica"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.vllm_adapters_resident = Gauge(
            "reclora_vllm_adapters_resident", "User adapters registered on a vLLM replica.", ["replica"], registry=r)
        self.vllm_adapter_loads = Counter(
            "reclora_vllm_adapter_loads", "User adapters loaded onto a vLLM replica.", ["replica"], registry=r)
        self.vllm_adapter_evictions = Counter(
            "reclora_vllm_adapter_evictions", "User adapters unloaded from a vLLM replica to stay within capacity.",
            ["replica"], registry=r)
        self.vllm_replica_up = Gauge(
            "reclora_vllm_replica_up", "1 while a vLLM replica takes requests, 0 while marked down.", ["replica"],
            registry=r)
        self.model_activations = Counter(
            "reclora_model_activations",
            "Model versions activated, by kind (activate, rollback, or follow: another gateway's activation).",
            ["kind"], registry=r)
        self.model_refusals = Counter(
            "reclora_model_refusals", "Model pushes and activations refused, by reason.", ["reason"], registry=r)
        # --- canary and online evaluation (online gauges by version: only the loaded ones, a bounded set)
        self.canary_percent = Gauge(
            "reclora_canary_percent", "Share of users routed to the canary's candidate (or shadowed by it); 0 without "
            "a canary.", registry=r)
        self.canary_shadow = Gauge(
            "reclora_canary_shadow", "1 while the running canary only shadows (its scores are recorded, not served).",
            registry=r)
        self.canary_responses = Counter(
            "reclora_canary_responses", "Score answers during a canary by side (stable, candidate) and outcome.",
            ["side", "outcome"], registry=r)
        self.canary_aborts = Counter(
            "reclora_canary_aborts", "Canaries aborted, by the guard rail that tripped (or operator).", ["rail"],
            registry=r)
        self.served_log = Counter(
            "reclora_served_log_scores", "Served scores for the log, by outcome (written; dropped: the writer's "
            "queue was full; failed: Redis refused or timed out).", ["outcome"], registry=r)
        self.shadow_requests = Counter(
            "reclora_shadow_requests", "Requests a shadow candidate was to score, by outcome (queued; not_queued: "
            "already queued or no engine thread; unscorable: the candidate's catalog lacks an item).", ["outcome"],
            registry=r)
        self.online_labels = Counter(
            "reclora_online_labels", "Behaviours joined with served scores, by outcome (joined; unmatched: no score "
            "served for the item; expired: served before the label window; error).", ["outcome"], registry=r)
        self.online_auc = Gauge(
            "reclora_online_auc", "Online AUC of a loaded version's labelled served scores over the window.",
            ["version"], registry=r)
        self.online_logloss = Gauge(
            "reclora_online_logloss", "Online LogLoss of a loaded version over the window.", ["version"], registry=r)
        self.online_mean_predicted = Gauge(
            "reclora_online_mean_predicted", "Mean served score of a loaded version's labelled scores (calibration: "
            "compare with reclora_online_positive_rate).", ["version"], registry=r)
        self.online_positive_rate = Gauge(
            "reclora_online_positive_rate", "Observed positive rate of a loaded version's labelled scores.",
            ["version"], registry=r)
        self.online_label_count = Gauge(
            "reclora_online_label_count", "Labelled served scores of a loaded version in the window.", ["version"],
            registry=r)
        # --- user knowledge vectors (versions with knowledge only)
        self.user_knowledge = Counter(
            "reclora_user_knowledge", "Score requests by the user knowledge vector they were scored with (vector; "
            "default_missing, default_mismatch: another encoder or dim, default_malformed: the CRM's default).",
            ["outcome"], registry=r)
        self.user_knowledge_age = Histogram(
            "reclora_user_knowledge_age_seconds", "Age of the user knowledge vector a request was scored with.",
            buckets=KNOWLEDGE_AGE_BUCKETS_S, registry=r)
        self.knowledge_refresh = Counter(
            "reclora_knowledge_refresh", "Nearline refreshes of user knowledge vectors by outcome (refreshed; failed; "
            "unavailable: due but no base LLM on this gateway; superseded: a newer vector was stored meanwhile).",
            ["outcome"], registry=r)
        self._online_versions: set[str] = set()
        # Outcome enum -> how one count lands (labelled counters take the member as their label).
        labelled = {DegradedReason: self.degraded, Admission: self.llm_admissions, CandidateSource: self.candidates,
                    ScoreCacheOutcome: self.score_cache, ShadowOutcome: self.shadow_requests,
                    KnowledgeOutcome: self.user_knowledge, BackgroundOutcome: self.background_jobs,
                    ServedLogOutcome: self.served_log, LabelOutcome: self.online_labels,
                    RefreshOutcome: self.knowledge_refresh, RefusalReason: self.model_refusals,
                    GuardRail: self.canary_aborts}
        unlabelled = {RequestWorkOutcome.ABANDONED: self.llm_abandoned, RequestWorkOutcome.EXPIRED: self.llm_expired,
                      AdapterCacheOutcome.HIT: self.adapter_cache_hits,
                      AdapterCacheOutcome.MISS: self.adapter_cache_misses,
                      AdapterCacheOutcome.EVICT: self.adapter_cache_evictions}
        by_replica = {ReplicaAdapterOutcome.LOADED: self.vllm_adapter_loads,
                      ReplicaAdapterOutcome.EVICTED: self.vllm_adapter_evictions}
        self._counts: dict[type[StrEnum], Callable[[StrEnum, float, str | None], None]] = {
            **{kind: _labelled(counter) for kind, counter in labelled.items()},
            RequestWorkOutcome: _each(unlabelled), AdapterCacheOutcome: _each(unlabelled),
            ReplicaAdapterOutcome: lambda outcome, n, on: by_replica[outcome].labels(on).inc(n),
            ServedOutcome: lambda outcome, n, on: self.canary_responses.labels(on, outcome).inc(n),
            ActivationKind: self._activated}
        self._measures: dict[StrEnum, Callable[[float, str | None], None]] = {
            **{stage: (lambda ms, on, stage=stage: self.stage_latency.labels(stage).observe(ms / 1000.0))
               for stage in Stage},
            Quantity.ENGINE_QUEUE_REQUESTS: lambda v, on: self.engine_queue_requests.set(v),
            Quantity.ENGINE_QUEUE_MS: lambda v, on: self.engine_queue_ms.set(v),
            Quantity.BACKGROUND_QUEUE_JOBS: lambda v, on: self.background_queue.set(v),
            Quantity.ADAPTER_CACHE_BYTES: lambda v, on: self.adapter_cache_bytes.set(v),
            Quantity.KNOWLEDGE_AGE_S: lambda v, on: self.user_knowledge_age.observe(v),
            Quantity.REPLICA_ADAPTER_LOAD_S: lambda v, on: self.vllm_adapter_load_latency.labels(on).observe(v),
            Quantity.REPLICA_ADAPTERS_RESIDENT: lambda v, on: self.vllm_adapters_resident.labels(on).set(v),
            Quantity.REPLICA_UP: lambda v, on: self.vllm_replica_up.labels(on).set(v),
            Quantity.CANARY_PERCENT: lambda v, on: self.canary_percent.set(v),
            Quantity.CANARY_SHADOW: lambda v, on: self.canary_shadow.set(v)}
        # Pre-create the known label sets so dashboards see zero-valued series from the start.
        for kind, counter in labelled.items():
            for member in kind:
                counter.labels(member)
        for kind in ActivationKind:
            self.model_activations.labels(kind)
        for side in CANARY_SIDES:
            for outcome in ServedOutcome:
                self.canary_responses.labels(side, outcome)
        for stage in Stage:
            self.stage_latency.labels(stage)
        for route in SHED_ROUTES:
            self.shed.labels(route)
            self.inflight.labels(route)

    def count(self, outcome: StrEnum, n: float = 1, *, on: str | None = None) -> None:
        """``Telemetry.count``: ``n`` occurrences of ``outcome`` on its enum's collector."""
        self._counts[type(outcome)](outcome, n, on)

    def measure(self, quantity: StrEnum, value: float, *, on: str | None = None) -> None:
        """``Telemetry.measure``: a stage's milliseconds (observed in seconds) or a quantity."""
        self._measures[quantity](value, on)

    def _activated(self, kind: StrEnum, n: float, version: str | None) -> None:
        self.model_activations.labels(kind).inc(n)
        if version is not None:
            self.set_model_version(version)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.request_latency.labels(method, route, str(status)).observe(seconds)

    def set_model_version(self, version: str) -> None:
        self.model.info({"version": version})

    def set_online(self, by_version: Mapping[str, VersionMetrics], loaded: set[str]) -> None:
        """The online gauges of the loaded versions; series of versions no longer loaded go away."""
        gauges = {self.online_auc: "auc", self.online_logloss: "logloss", self.online_mean_predicted: "mean_predicted",
                  self.online_positive_rate: "positive_rate", self.online_label_count: "labels"}
        shown = {v for v in by_version if v in loaded}
        for version in self._online_versions - shown:
            for gauge in gauges:
                try:
                    gauge.remove(version)
                except KeyError:
                    pass
        for version in shown:
            for gauge, attr in gauges.items():
                value = getattr(by_version[version], attr)
                if value is None:
                    try:
                        gauge.remove(version)
                    except KeyError:
                        pass
                else:
                    gauge.labels(version).set(value)
        self._online_versions = shown

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type, for the /metrics route; OpenMetrics when the
        scraper's Accept header asks for it, else the Prometheus text format."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def _labelled(counter: Counter) -> Callable[[StrEnum, float, str | None], None]:
    return lambda outcome, n, on: counter.labels(outcome).inc(n)


def _each(counters: Mapping[StrEnum, Counter]) -> Callable[[StrEnum, float, str | None], None]:
    return lambda outcome, n, on: counters[outcome].inc(n)
