"""What the scoring pipeline promises everyone else: the ``Scorer`` protocol, its result types,
the reasons an answer is degraded, the one refusal it raises (unknown items), the online
evaluation of served scores (``OnlineEvaluation``: labels from events, metrics per version),
the nearline refresh of users' knowledge vectors (``KnowledgeRefresh``), and the explanation of
one request's scores (``Explainer``, ``Explanation``).

The HTTP layer, the metrics and the docs all read these from here; the values of
``DegradedReason`` are the strings clients and dashboards see in ``degraded_reasons`` and in the
``reason`` label of ``reclora_degraded_responses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from service.history import AppendResult
from service.llm.gate_mixture import GateMixture, GroupMixture, MetaWeight  # noqa: F401  (parts of an explanation)
from service.model.fusion import ScoreSource  # noqa: F401  (re-exported: a part of the result)


class DegradedReason(StrEnum):
    """Why an answer carries less than the full model (the CRM alone, or a cold-start user)."""

    HISTORY_UNAVAILABLE = "history_unavailable"  # Redis failed or exceeded its budget: scored as cold start
    DEADLINE = "deadline"  # too little time left for the LLM stage (under ``llm_min_ms``)
    LLM_OVERRUN_EXPECTED = "llm_overrun_expected"  # the engine's pace predicts the forward would overrun
    LLM_QUEUE = "llm_queue"  # the work queued on the engine would not let this request finish in time
    LLM_TIMEOUT = "llm_timeout"  # the forward was abandoned at the deadline
    LLM_ERROR = "llm_error"  # the engine failed
    LLM_PARTIAL = "llm_partial"  # some candidates carry LLM scores (from the cache), the rest the CRM's


class Admission(StrEnum):
    """What a request's LLM stage decided for the candidates without a cached LLM score."""

    LIVE = "live"  # scored by the engine now
    CACHED = "cached"  # every candidate had a cached score: no engine work
    DEADLINE = "deadline"
    OVERRUN = "overrun"  # its own forward would overrun
    QUEUE = "queue"  # its forward after the queued work would overrun


class ServedOutcome(StrEnum):
    """How a score request ended, per version (the canary's guard rails compare them)."""

    OK = "ok"
    DEGRADED = "degraded"
    ERROR = "error"  # an exception instead of an answer (a 5xx)


class Stage(StrEnum):
    """The timed stages of a score request (the keys of ``timings_ms``, the ``stage`` label)."""

    HISTORY = "history"
    CRM = "crm"
    RETRIEVAL = "retrieval"
    PROMPTS = "prompts"
    ADAPTER = "adapter"
    LLM_CACHE = "llm_cache"
    LLM = "llm"
    TOTAL = "total"


class ScoreCacheOutcome(StrEnum):
    """Candidates looked up in (or written to) the LLM score cache, by outcome."""

    HIT = "hit"
    MISS = "miss"
    ERROR = "error"  # the lookup failed or ran past its budget: all misses
    WRITE_ERROR = "write_error"


class ShadowOutcome(StrEnum):
    """What became of a request a shadow candidate was to score."""

    QUEUED = "queued"
    NOT_QUEUED = "not_queued"  # already queued, or no engine thread
    UNSCORABLE = "unscorable"  # the candidate's catalog lacks an item


class CandidateSource(StrEnum):
    """Where a candidate's LLM score came from."""

    LIVE = "live"
    CACHED = "cached"
    NONE = "none"  # no LLM score: the CRM's


@dataclass
class CandidateResult:
    item_id: int
    score: float
    llm_score: float | None
    crm_score: float


@dataclass
class ScoreResult:
    user_id: str
    model_version: str
    candidates: list[CandidateResult]
    degraded: bool = False
    degraded_reasons: list[DegradedReason] = field(default_factory=list)
    cold_start: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    score_source: ScoreSource = ScoreSource.FUSED  # how the version makes ``score`` where the LLM ran
    adapter: str | None = None  # the prototype whose adapter the LLM scored with (None: the user's own, or none)


class UnknownItems(ValueError):
    """Candidates the catalog of the version that would score them does not know; nothing was scored."""

    def __init__(self, items: Sequence[int], model_version: str) -> None:
        self.items = list(items)
        self.model_version = model_version
        super().__init__(f"{len(self.items)} item id(s) not in the catalog of model {model_version}")


class Overloaded(RuntimeError):
    """The service is past a bound (requests in flight, work queued): nothing was scored; retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class VersionMetrics:
    """One version's labelled served scores over a window: ranking (AUC), probability quality
    (LogLoss) and calibration (mean predicted against the observed positive rate). AUC is None
    until both labels occur; the others until there is a label."""

    version: str
    labels: int
    positives: int
    auc: float | None
    logloss: float | None
    mean_predicted: float | None
    positive_rate: float | None


@dataclass(frozen=True)
class OnlineReport:
    """The window's metrics per version, and the same per time bucket (oldest first)."""

    window_s: float
    bucket_s: float
    versions: list[VersionMetrics]
    series: list[tuple[float, VersionMetrics]]  # (bucket start, Unix seconds; that bucket's metrics)


class OnlineEvaluation(Protocol):
    """What the HTTP layer needs from the online evaluation of served scores."""

    def observe(self, user_id: str, events: Sequence[tuple[int, float]]) -> None:
        """(item, rating) behaviours just appended for the user: each labels the score served to
        that user for that item within the label window, off the request path."""
        ...

    async def report(self, window_s: float | None = None, bucket_s: float = 60.0) -> OnlineReport:
        """Metrics per version over the last ``window_s`` (default: the configured window)."""
        ...

    async def run(self) -> None:
        """Keep the metrics (and what reads them) current until cancelled."""
        ...


class KnowledgeRefresh(Protocol):
    """What the HTTP layer needs from the nearline refresh of users' knowledge vectors."""

    def observe(self, user_id: str, appended: AppendResult) -> bool:
        """Events were just appended for the user: queue a refresh of their knowledge vector when
        it is due (returns whether one was queued); never waits for it."""
        ...

    def close(self) -> None:
        """Stop refreshing (called once, at shutdown)."""
        ...


class LLMUnavailable(StrEnum):
    """Why an explanation carries no LLM scores, besides the deadline reasons of ``DegradedReason``."""

    NO_LLM = "no_llm"  # the version has no LoRA: a CRM-only bundle
    NO_ENGINE = "no_engine"  # the gateway runs no LLM engine


@dataclass(frozen=True)
class ReadBehaviour:
    """One history behaviour a candidate's prompt read."""

    item_id: int  # raw id
    title: str
    rating: float
    position: int  # in the stored history, 0 = the oldest
    rank: int  # 1 = the most similar to the candidate of the behaviours read
    similarity: float  # inner product of the item's and the candidate's embeddings (what retrieval ranks by)


@dataclass(frozen=True)
class CandidateExplanation:
    item_id: int
    title: str
    crm_score: float
    llm_score: float | None  # None where the LLM part was not computed
    fused_score: float | None  # the version's fusion of the two (None without an LLM score or a fusion)
    served_score: float  # what /v1/score serves for it when its LLM stage scores it
    prompt_tokens: int | None  # prefix + this candidate's suffix (None without a prompt)
    history: tuple[ReadBehaviour, ...]


@dataclass(frozen=True)
class AdapterExplanation:
    """The user's adapter: ``meta_loras`` (gates over meta-LoRAs; ``mixture`` is the user's own) or
    ``single_lora`` (one shared LoRA, no gate); where the version serves prototypes, the one the
    user is served and its centroid's mixture."""

    kind: str
    mixture: GateMixture | None = None
    temperature: float | None = None
    prototype: str | None = None
    prototype_mixture: GateMixture | None = None


@dataclass(frozen=True)
class Explanation:
    user_id: str
    model_version: str
    score_source: ScoreSource
    cold_start: bool
    history_length: int
    prompt_form: str | None
    prefix_tokens: int | None
    candidates: list[CandidateExplanation]
    adapter: AdapterExplanation | None
    llm_computed: bool
    llm_reason: DegradedReason | LLMUnavailable | None  # why not computed (None when computed)
    deadline_ms: float
    degraded_reasons: list[DegradedReason] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


class Explainer(Protocol):
    """What the HTTP layer needs to explain a request's scores without serving any."""

    async def explain(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None) -> Explanation:
        """Every part of the scores of ``candidates`` for the user, the LLM's computed within the
        deadline even where the version serves its CRM alone; writes nothing that scoring reads.
        Raises ``UnknownItems`` and ``Overloaded`` as ``Scorer.score`` does."""
        ...

    def close(self) -> None:
        """Release its threads (called once, at shutdown)."""
        ...


class Scorer(Protocol):
    """What the HTTP layer needs from the model runtime."""

    @property
    def model_version(self) -> str:
        """The bundle version answering requests now."""
        ...

    def unknown_items(self, ids: Sequence[int]) -> list[int]:
        """The ids among ``ids`` that the active catalog does not know (empty when all are known)."""
        ...

    async def score(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None,
                    request_id: str = "") -> ScoreResult:
        """Score every candidate for the user within the deadline; degrade instead of raising.

        Raises ``UnknownItems`` (and scores nothing) when a candidate is not in the catalog of the
        version the request was given: the check and the scoring read one snapshot; raises
        ``Overloaded`` when its work queues are full."""
        ...

    def close(self) -> None:
        """Release threads and engine connections (called once, at shutdown)."""
        ...
