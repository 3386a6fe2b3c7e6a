"""The service's configuration, read from ``RECLORA_*`` environment variables (or ``.env``).

Every knob the runtime reads lives here so a deployment is described by its environment alone.
The knobs come in groups, one per concern (``HistorySettings``, ``CanarySettings``, ...), and each
component takes its group whole, so a setting keeps its name from the environment to the code that
reads it. Each group reads its own fields from the environment (``RECLORA_<FIELD>``, the same flat
names whatever the group), so one group can also be read alone. ``Settings`` bundles them; it is
passed explicitly (``build_app(settings)``) and ``get_settings()`` only serves the process entry
point, so tests can build several differently configured apps side by side.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.bundle.manifest import SHA256_HEX, validate_version

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
BundleVersion = Annotated[str, AfterValidator(validate_version)]


class SettingsGroup(BaseSettings):
    """One group of settings; the environment variable of field ``x`` is ``RECLORA_X``."""

    model_config = SettingsConfigDict(env_prefix="RECLORA_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", frozen=True)


class HttpSettings(SettingsGroup):
    """The HTTP server and what it accepts before any route runs."""

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 in containers.")
    port: int = Field(8000, ge=1, le=65535)
    shutdown_delay_s: float = Field(0.0, ge=0, le=300, description=(
        "After SIGTERM, answer /readyz with 503 for this long while still serving, so load balancers "
        "stop routing here before connections close (set a few seconds under Kubernetes)."))
    graceful_timeout_s: float = Field(20.0, gt=0, description="Then wait this long for in-flight requests.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    docs_enabled: bool = Field(True, description=(
        "Serve the OpenAPI document (/openapi.json) and its pages (/docs, /redoc, assets shipped with the "
        "service, no CDN); false answers 404 on all of them."))


class HistorySettings(SettingsGroup):
    """The history store (Redis). Short socket timeouts by default: the gateway reads inside a
    per-request deadline and treats a slow or dead Redis as unreachable (cold start) rather than
    waiting on it."""

    redis_url: str = Field("redis://127.0.0.1:6379/0", description=(
        "redis:// or rediss:// URL of the history store; with redis_cluster, one node of the cluster (a seed: the "
        "client discovers the others)."))
    redis_cluster: bool = Field(False, description=(
        "The history store is a Redis (or Valkey) Cluster: clients follow MOVED/ASK redirects and replica "
        "promotions. Every user's keys share one hash slot ({u:<id>}), so each read, append and score-cache "
        "lookup stays on one shard."))
    redis_prefix: str = Field("", max_length=64, description="Prefix of every key, e.g. 'reclora:'; no braces.")
    redis_timeout_s: float = Field(0.5, gt=0, le=30, description=(
        "Socket connect and read timeout: a slow Redis counts as unreachable rather than eating the deadline."))
    redis_max_connections: int | None = Field(None, ge=1, description="Connection pool cap; None = redis-py default.")
    history_max_events: int = Field(1000, ge=1, le=100_000, description="Behaviours kept (and read) per user.")
    events_durable: bool = Field(False, description=(
        "Acknowledge POST /v1/events only after Redis reports the write on disk (WAITAOF; Redis 7.2+ with "
        "appendonly yes). The gateway refuses to start when the server cannot. On a cluster the write must be "
        "on the disks of the user's master and of one of its replicas (WAITAOF 1 1; replicas with appendfsync "
        "always acknowledge at once, everysec within about a second): a slot whose master has no replica "
        "refuses durable appends (503) until one joins."))

    @model_validator(mode="after")
    def _no_hash_tag(self) -> HistorySettings:
        if "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ValueError("redis_prefix must not contain braces (they would become the cluster hash tag)")
        return self


class ModelSettings(SettingsGroup):
    """Which model this gateway serves, from which store, with which base LLM and engine, and
    what a version may bring."""

    model_store: Path = Field(Path("model_store"), description="Directory of versioned model bundles.")
    active_version: BundleVersion | None = Field(None, description=(
        "Bundle version to serve; None = the store's active pointer, else its newest version."))
    base_model_dir: Path = Field(Path("models/smollm2-135m-instruct"), description=(
        "Local Hugging Face directory of the base LLM; weights are never fetched at run time."))
    engine: Literal["torch", "vllm"] = Field("torch", description="LLM scoring engine.")
    model_poll_s: float = Field(10.0, ge=0, description=(
        "Check the store's ACTIVE pointer this often and serve what it names, so every gateway sharing "
        "a store follows an activation made through any of them; 0 = off. Off when active_version is set."))
    max_lora_rank: int = Field(64, ge=1, le=1024, description="Highest LoRA rank a version may bring.")
    max_prototypes: int = Field(16, ge=1, le=4096, description=(
        "Most prototype adapters a served version may bring; on vLLM every replica keeps them all loaded, so at "
        "most what the servers' --max-loras and --max-cpu-loras leave for them (docs/VLLM.md)."))
    adapter_mode: Literal["auto", "prototypes", "exact"] = Field("auto", description=(
        "Where a version carries prototype adapters (exported with --prototypes): 'prototypes' serves each user "
        "the prototype nearest to the user's gate outputs (P adapters for everyone, preloaded on every vLLM "
        "replica); 'exact' mixes each user's own adapter; 'auto' is 'prototypes' on vLLM and 'exact' on the "
        "embedded engine, which mixes every user's own adapter in its forward at no extra cost. Versions "
        "without prototypes are always exact."))

    @property
    def serves_prototypes(self) -> bool:
        """Whether versions that carry prototype adapters serve them."""
        return self.adapter_mode == "prototypes" or (self.adapter_mode == "auto" and self.engine == "vllm")

    @property
    def follows_store(self) -> bool:
        """Whether this gateway serves what the store's ACTIVE pointer names, polling it."""
        return bool(self.model_poll_s) and self.active_version is None


class TorchSettings(SettingsGroup):
    """The embedded engine (engine=torch) and torch itself."""

    torch_device: str = Field("cpu", description="torch device of the embedded engine and the CRM, e.g. cuda:0.")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Weights of the embedded engine; auto = bfloat16 on GPUs and CPUs with native bfloat16, else float32."))
    torch_threads: int | None = Field(None, ge=1, le=512, description=(
        "torch intra-op threads of the engine's thread; None = torch default (the CPUs). The gateway's "
        "other threads (CRM, retrieval and prompts, loading) compute on one."))
    gateway_threads_nice: int = Field(6, ge=0, le=19, description=(
        "With the embedded engine, the nice increment the gateway's event loop thread takes once the engine's "
        "thread runs (Linux; threads it starts later inherit it): the CRM-only answers of a burst then compute "
        "in the engine's idle time instead of slowing its forwards past their deadline; higher values give the "
        "engine more and answer the other requests later (docs/ENGINE.md, \"Threads\"). 0: all threads alike."))
    torch_max_batch: int = Field(32, ge=1, le=1024, description=(
        "Most candidate rows the embedded engine runs in one packed forward."))
    torch_min_shared_tokens: int = Field(12, ge=1, description=(
        "Tokens of work a run shared by several candidates must save before the embedded engine "
        "computes it once for all of them (a shared run costs a row of its own and a cache copy)."))
    torch_native_kernels: bool = Field(True, description=(
        "On CPUs, the engine's attention, rotary and the MLP's SiLU product run in native kernels built on "
        "first use with the local C++ compiler (cached under XDG_CACHE_HOME); without a compiler, or "
        "when false, torch's kernels."))


class VLLMSettings(SettingsGroup):
    """The remote engine (engine=vllm): its replicas and the adapters the gateway hands them."""

    vllm_url: HttpUrl | None = Field(None, description="Base URL of the vLLM server (engine=vllm).")
    vllm_urls: list[HttpUrl] = Field(default_factory=list, description=(
        "Base URLs of the vLLM replicas, a JSON list (RECLORA_VLLM_URLS='[\"http://vllm-0:8000\"]'); "
        "vllm_url is appended when set. Users are routed to replicas by consistent hashing."))
    vllm_adapter_dir: Path = Field(Path("/tmp/reclora-adapters"), description=(
        "Where the gateway writes user adapters; the vLLM servers must read the same files (shared "
        "volume). Give each gateway instance its own directory: it deletes what it evicts."))
    vllm_adapter_server_dir: str | None = Field(None, description=(
        "The same directory as the vLLM servers see it, when mounted at another path; None = same path."))
    vllm_max_adapters: int = Field(8, ge=1, le=100_000, description=(
        "User adapters kept registered per replica (least recently used unloaded beyond); at most the "
        "server's --max-cpu-loras, so a registered adapter never has to be re-read from disk."))
    vllm_scoring_api: Literal["auto", "generative_scoring", "completions"] = Field("auto", description=(
        "auto = POST /generative_scoring where the server has it, else one completion per candidate."))
    vllm_connect_timeout_s: float = Field(1.0, gt=0, le=30, description="TCP connect timeout to a replica.")
    vllm_load_timeout_s: float = Field(10.0, gt=0, le=300, description="Longest wait for an adapter load.")
    vllm_health_interval_s: float = Field(2.0, gt=0, le=300, description=(
        "How often replicas' /health is probed; a replica marked down comes back after a passing probe."))
    vllm_max_connections: int = Field(32, ge=1, le=4096, description="Pooled HTTP connections per replica.")
    vllm_load_factor: float = Field(1.25, ge=1.0, le=10.0, description=(
        "Bounded-load factor of the affinity routing: a replica takes at most this times the mean "
        "in-flight load before a user spills to the next one."))

    @property
    def replica_urls(self) -> list[str]:
        """``vllm_urls`` then ``vllm_url`` (unless already listed), without trailing slashes."""
        urls = [str(u).rstrip("/") for u in self.vllm_urls]
        if self.vllm_url is not None and str(self.vllm_url).rstrip("/") not in urls:
            urls.append(str(self.vllm_url).rstrip("/"))
        return urls


class AdapterCacheSettings(SettingsGroup):
    """The cache of materialized user adapters."""

    adapter_cache_bytes: int = Field(256 << 20, ge=0, description="Memory bound of the materialized-adapter LRU.")
    adapter_drift_tol: float = Field(0.02, ge=0, le=1, description=(
        "Reuse a cached user adapter while no mixture weight moved by more than this."))


class RequestSettings(SettingsGroup):
    """What one request may ask for, the deadline it is served in, and how many are taken at once
    (admission and shedding)."""

    max_candidates: int = Field(100, ge=1, le=10_000, description="Most candidates per score request.")
    default_deadline_ms: int = Field(500, gt=0, description="Deadline of a score request that names none.")
    max_deadline_ms: int = Field(10_000, gt=0, description="Largest deadline a caller may ask for.")
    history_budget_ms: float = Field(50.0, gt=0, description="Redis read budget; beyond it the user is cold start.")
    crm_budget_ms: float = Field(100.0, gt=0, description="Expected CRM stage time (planning and alerting).")
    llm_min_ms: float = Field(50.0, gt=0, description=(
        "Least time left before the deadline for the LLM stage to start; with less the answer is the "
        "CRM scores, marked degraded."))
    max_inflight_score: int | None = Field(None, ge=1, le=100_000, description=(
        "Score requests served at once by one gateway; past it POST /v1/score answers 429 with "
        "Retry-After at once instead of queueing. None = as many as one CRM worker serves within the "
        "default deadline (default_deadline_ms / crm_budget_ms, at least 2)."))
    max_inflight_events: int | None = Field(None, ge=1, le=100_000, description=(
        "Event and profile writes served at once; past it 429 with Retry-After. None = 16 per CPU core."))
    max_cpu_queue: int | None = Field(None, ge=1, le=100_000, description=(
        "Score requests waiting for the CRM worker; past it 429. None = max_inflight_score."))
    shed_retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a shed (429) answer, seconds.")
    llm_admission: Literal["queue", "pace"] = Field("queue", description=(
        "queue = the LLM stage runs only when the work queued on the engine plus the request's own forward "
        "fit in the time left; pace = only its own forward is counted (an older rule, kept for comparison: "
        "under concurrency most forwards it starts are abandoned)."))

    @property
    def score_inflight_limit(self) -> int:
        """Requests queue for one CRM worker; more than it serves within the deadline would
        answer late, so they are shed instead."""
        return self.max_inflight_score or max(2, int(self.default_deadline_ms // self.crm_budget_ms))

    @property
    def events_inflight_limit(self) -> int:
        return self.max_inflight_events or 16 * (os.cpu_count() or 1)

    @property
    def cpu_queue_limit(self) -> int:
        return self.max_cpu_queue or self.score_inflight_limit

    @property
    def queue_aware(self) -> bool:
        """Whether LLM admission counts the work queued on the engine (``llm_admission`` queue)."""
        return self.llm_admission == "queue"

    @model_validator(mode="after")
    def _deadlines(self) -> RequestSettings:
        if self.default_deadline_ms > self.max_deadline_ms:
            raise ValueError(f"default_deadline_ms ({self.default_deadline_ms}) exceeds max_deadline_ms "
                             f"({self.max_deadline_ms})")
        return self


class ScoreCacheSettings(SettingsGroup):
    """LLM scores kept in Redis, shared by every gateway replica."""

    llm_score_cache: bool = Field(True, description=(
        "Keep LLM scores in Redis, shared by every gateway replica, keyed by model version and a fingerprint "
        "of the prompt, adapter and history; candidates without one are scored in the background for the "
        "user's next request. False = every LLM score is computed live."))
    llm_score_cache_ttl_s: int = Field(600, ge=1, le=30 * 86_400, description="Lifetime of cached LLM scores.")
    llm_score_cache_budget_ms: float = Field(50.0, gt=0, description=(
        "Redis read budget of the LLM score cache; beyond it every candidate is a miss."))


class BackgroundSettings(SettingsGroup):
    """The engine's queue of background jobs (scores for the next visit, shadows, refreshes)."""

    background_max_jobs: int = Field(256, ge=1, le=1_000_000, description=(
        "Background engine jobs queued at most; the oldest are dropped first."))
    background_max_age_s: float = Field(60.0, gt=0, description=(
        "A background job older than this when the engine is free is dropped (its user has moved on)."))
    engine_pack_tokens: int = Field(4096, ge=0, le=1_000_000, description=(
        "Prompt tokens that one forward of the embedded engine takes from several users at most: waiting "
        "requests packed together, or else background jobs packed together (never the two mixed). "
        "0 = one request per forward."))


class KnowledgeRefreshSettings(SettingsGroup):
    """The nearline refresh of users' knowledge vectors."""

    knowledge_refresh_events: int = Field(20, ge=0, le=1_000_000, description=(
        "Regenerate a user's knowledge vector (base LLM, then the version's text encoder) as a background job "
        "once this many events were appended since it was made; until then the previous vector serves. "
        "0 = never (only versions with knowledge, on a gateway with the embedded engine's base LLM)."))


class EventsSettings(SettingsGroup):
    """What POST /v1/events accepts."""

    max_event_batch: int = Field(100, ge=1, le=10_000, description="Most events per POST /v1/events.")
    rating_min: float = Field(0.5, description="Lowest rating an event may carry.")
    rating_max: float = Field(5.0, description="Highest rating an event may carry.")
    max_event_future_s: int = Field(86_400, ge=0, description=(
        "How far ahead of the server clock an event timestamp (seconds) may lie: clock skew, not ms."))

    @model_validator(mode="after")
    def _rating_range(self) -> EventsSettings:
        if self.rating_min >= self.rating_max:
            raise ValueError(f"rating_min ({self.rating_min}) must be below rating_max ({self.rating_max})")
        return self


class AdminSettings(SettingsGroup):
    """The model administration API (/admin/v1)."""

    admin_enabled: bool = Field(False, description=(
        "Serve the admin API (push, validate, activate, roll back, delete model versions)."))
    admin_token_sha256: list[str] = Field(default_factory=list, description=(
        "Hex sha256 of each accepted admin bearer token, as a JSON list; the tokens themselves are "
        "never stored. `reclora admin-token` makes a token and its hash."))
    admin_max_upload_bytes: int = Field(4 << 30, ge=1024, description="Largest model upload (body and unpacked).")

    @model_validator(mode="after")
    def _tokens(self) -> AdminSettings:
        for digest in self.admin_token_sha256:
            if not SHA256_HEX.fullmatch(digest):
                raise ValueError("admin_token_sha256 entries must be 64 lowercase hex characters (a sha256 digest)")
        if self.admin_enabled and not self.admin_token_sha256:
            raise ValueError("the admin API is enabled but no admin token is configured: set "
                             "RECLORA_ADMIN_TOKEN_SHA256 (see `reclora admin-token`) or disable it")
        return self


class OnlineSettings(SettingsGroup):
    """The served-score log and the online evaluation that joins it with later events."""

    served_log: bool = Field(True, description=(
        "Record every served score (request, user, item, version, scores, time) in a bounded Redis stream "
        "and per user for the label join, off the request path; False = no log, so neither online evaluation "
        "nor shadow scoring."))
    served_log_max_len: int = Field(1_000_000, ge=100, le=100_000_000, description=(
        "Entries the served-score stream keeps at most (trimmed approximately, XADD MAXLEN ~)."))
    served_log_max_age_s: int = Field(86_400, ge=60, le=90 * 86_400, description=(
        "Entries older than this are trimmed from the served-score stream (XTRIM MINID ~)."))
    served_log_shards: int = Field(1, ge=1, le=1024, description=(
        "Streams the served-score log (and its stream of labels) is split over, by user, each its own key and "
        "hash slot, so a cluster spreads their writes; readers merge them. served_log_max_len holds per shard "
        "as max_len / shards."))
    served_log_queue: int = Field(1024, ge=1, le=1_000_000, description=(
        "Responses waiting for the log writer at most; past it a response's scores are dropped from the "
        "log (counted), never delaying or failing the response."))
    online_label_window_s: int = Field(1800, ge=1, le=7 * 86_400, description=(
        "An event labels the score served to the same user for the same item at most this long before it."))
    online_window_s: int = Field(3600, ge=60, le=30 * 86_400, description=(
        "Sliding window of the online metrics (AUC, LogLoss, calibration) per version."))
    online_max_labels: int = Field(200_000, ge=100, le=10_000_000, description=(
        "Labelled scores kept and evaluated per window at most (the oldest go first)."))
    online_eval_interval_s: float = Field(5.0, ge=0.05, le=3600, description=(
        "Recompute the online metrics (and the canary's online guard rail) at most this often."))
    online_label_threshold: float | None = Field(None, description=(
        "label = rating > threshold, as in training; None = the served version's dataset.json."))


class CanarySettings(SettingsGroup):
    """The canary's guard rails: when a candidate is aborted without waiting for a person."""

    canary_guard: bool = Field(True, description="Abort a canary automatically when a guard rail trips.")
    canary_min_requests: int = Field(500, ge=1, le=10_000_000, description=(
        "Responses each side of a canary must have served before its error, degraded and latency rails apply."))
    canary_max_error_excess: float = Field(0.01, ge=0, le=1, description=(
        "Abort when the candidate's share of failed requests exceeds the stable version's by more than this."))
    canary_max_degraded_excess: float = Field(0.05, ge=0, le=1, description=(
        "Abort when the candidate's share of degraded answers exceeds the stable version's by more than this."))
    canary_max_p99_excess_ms: float = Field(50.0, ge=0, description=(
        "Abort when the candidate's p99 latency exceeds the stable version's by more than this."))
    canary_min_labels: int = Field(500, ge=10, le=10_000_000, description=(
        "Labelled scores each side needs in the online window before the online AUC rail applies."))
    canary_max_auc_drop: float = Field(0.02, ge=0, le=1, description=(
        "Abort when the candidate's online AUC is below the stable version's by more than this."))


class ExplainSettings(SettingsGroup):
    """POST /v1/explain: every part of a request's scores, the LLM's computed on demand."""

    explain_enabled: bool = Field(False, description=(
        "Serve POST /v1/explain (404 when false); with the admin API on it needs the admin token."))
    explain_deadline_ms: int = Field(5_000, gt=0, le=600_000, description=(
        "Deadline of an explain request that names none; past it the LLM part is reported as not computed."))
    explain_top_meta: int = Field(3, ge=1, le=1024, description=(
        "Meta-LoRAs reported per layer group and averaged (the heaviest gate weights)."))
    explain_max_inflight: int = Field(1, ge=1, le=64, description=(
        "Explain requests served at once; past it 429 with Retry-After (each runs an LLM forward)."))


class LoggingSettings(SettingsGroup):
    """The process's log lines (stderr)."""

    log_level: LogLevel = "INFO"
    log_json: bool = Field(True, description="One JSON object per line; False for human-readable lines.")


class Settings(BaseModel):
    """Every group of settings. Built with no arguments it reads the environment; keyword arguments
    may name settings flat (``Settings(redis_url=..., max_candidates=...)``, each routed to its
    group, the rest of which still comes from the environment) or give a group whole (``history=``).
    ``pydantic-settings`` options (``_env_file=None``) apply to every group."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    http: HttpSettings
    history: HistorySettings
    model: ModelSettings
    torch: TorchSettings
    vllm: VLLMSettings
    adapter_cache: AdapterCacheSettings
    requests: RequestSettings
    score_cache: ScoreCacheSettings
    background: BackgroundSettings
    knowledge_refresh: KnowledgeRefreshSettings
    events: EventsSettings
    admin: AdminSettings
    online: OnlineSettings
    canary: CanarySettings
    explain: ExplainSettings
    logging: LoggingSettings

    @classmethod
    def groups(cls) -> dict[str, type[SettingsGroup]]:
        """Each group's class by its name here (``settings.<name>``)."""
        return {name: field.annotation for name, field in cls.model_fields.items()}

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every environment variable the service reads its settings from."""
        return frozenset(f"{group.model_config['env_prefix']}{name}".upper()
                         for group in cls.groups().values() for name in group.model_fields)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (flat names or whole groups), validated like the original."""
        return type(self)(**{**dict(self), **changes})

    @model_validator(mode="before")
    @classmethod
    def _route_to_groups(cls, data: Any) -> Any:
        """Build each group from its flat keyword arguments (over a group given whole), the
        environment supplying the rest; the errors of every group are reported together."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        options = {key: data.pop(key) for key in [k for k in data if k.startswith("_")]}
        errors = []
        for name, group in cls.groups().items():
            given = data.get(name)
            flat = {key: data.pop(key) for key in [k for k in data if k in group.model_fields]}
            if isinstance(given, group) and not flat:
                continue
            base = given.model_dump() if isinstance(given, group) else dict(given or {})
            try:
                data[name] = group(**options, **{**base, **flat})
            except ValidationError as exc:
                errors += exc.errors()
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.model.engine == "vllm" and not self.vllm.replica_urls:
            raise ValueError("engine 'vllm' needs vllm_urls or vllm_url (RECLORA_VLLM_URLS / RECLORA_VLLM_URL)")
        return self


@cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
