"""How components report what happened, for the metrics: one small interface of typed outcomes.

A component counts an outcome (a member of its own ``StrEnum``: why an answer degraded, how a
background job ended) or measures a quantity (a stage's milliseconds, a queue's depth), and
knows nothing of Prometheus: ``service.metrics.Metrics`` implements ``Telemetry`` and maps each
enum to its collector, with label sets taken from the enums. Adding a metric is a member (or an
enum) where the component reports it and its collector in ``service.metrics``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Quantity(StrEnum):
    """What a component measures; each maps to one histogram or gauge."""

    ENGINE_QUEUE_REQUESTS = "engine_queue_requests"  # requests waiting for or running on the engine
    ENGINE_QUEUE_MS = "engine_queue_ms"  # predicted milliseconds of request work queued on the engine
    BACKGROUND_QUEUE_JOBS = "background_queue_jobs"  # background jobs waiting for an idle engine
    ADAPTER_CACHE_BYTES = "adapter_cache_bytes"  # bytes held by cached user adapters
    KNOWLEDGE_AGE_S = "knowledge_age_s"  # age of the user knowledge vector a request was scored with
    REPLICA_ADAPTER_LOAD_S = "replica_adapter_load_s"  # one adapter load on a vLLM replica (on: the replica)
    REPLICA_ADAPTERS_RESIDENT = "replica_adapters_resident"  # adapters registered on a replica (on: the replica)
    REPLICA_UP = "replica_up"  # 1 while a replica takes requests (on: the replica)
    CANARY_PERCENT = "canary_percent"  # share of users routed to (or shadowed by) the canary; 0 without one
    CANARY_SHADOW = "canary_shadow"  # 1 while the running canary only shadows


class Telemetry(Protocol):
    """What components report through; ``on`` names the bounded thing it happened on where the
    metric has such a label (a replica, a canary side, the version activated), never a user."""

    def count(self, outcome: StrEnum, n: float = 1, *, on: str | None = None) -> None:
        """``n`` occurrences of ``outcome``."""
        ...

    def measure(self, quantity: StrEnum, value: float, *, on: str | None = None) -> None:
        """One measurement: a duration observed, or a level set."""
        ...


class NoTelemetry:
    """Reports nowhere: components built without metrics (tests, offline tools)."""

    def count(self, outcome: StrEnum, n: float = 1, *, on: str | None = None) -> None:
        pass

    def measure(self, quantity: StrEnum, value: float, *, on: str | None = None) -> None:
        pass


NO_TELEMETRY = NoTelemetry()
