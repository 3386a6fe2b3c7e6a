"""The canary's guard rails: when to abort a candidate without waiting for a person.

Each side of a live canary (stable, candidate) counts its responses since the canary started:
failures, degraded answers and latencies (the most recent ``LATENCY_SAMPLES``). Once both sides
have served ``canary_min_requests``, the candidate is aborted when its failure share, its degraded share
or its p99 latency exceeds the stable version's by the configured margin. With ``canary_min_labels``
labelled scores on both sides in the online window (a shadow candidate included), it is aborted
when its online AUC is below the stable version's by more than ``canary_max_auc_drop``. Requests are
counted per gateway (each guards what it serves); labels come from Redis, shared by all. A rail
trips once per canary.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from service.config import CanarySettings
from service.scoring.contracts import ServedOutcome, VersionMetrics

LATENCY_SAMPLES = 5000


class GuardRail(StrEnum):
    """Why a canary was aborted (the ``rail`` label of ``reclora_canary_aborts``): a guard rail
    that tripped, or the operator."""

    ERRORS = "errors"
    DEGRADED = "degraded"
    LATENCY = "latency_p99"
    ONLINE_AUC = "online_auc"
    OPERATOR = "operator"  # aborted through the admin API, not by a rail


@dataclass(frozen=True)
class Trip:
    rail: GuardRail
    reason: str


@dataclass
class SideStats:
    requests: int = 0
    errors: int = 0
    degraded: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def add(self, outcome: ServedOutcome, ms: float) -> None:
        self.requests += 1
        self.errors += outcome is ServedOutcome.ERROR
        self.degraded += outcome is ServedOutcome.DEGRADED
        if outcome is not ServedOutcome.ERROR:
            self.latencies_ms.append(ms)

    def share(self, n: int) -> float:
        return n / self.requests if self.requests else 0.0

    def p99(self) -> float | None:
        return float(np.percentile(np.fromiter(self.latencies_ms, float), 99)) if self.latencies_ms else None

    def summary(self) -> dict[str, float | int | None]:
        return {"requests": self.requests, "error_share": self.share(self.errors),
                "degraded_share": self.share(self.degraded), "p99_ms": self.p99()}


class CanaryGuard:
    """The rails of one canary at a time (``begin`` resets them)."""

    def __init__(self, settings: CanarySettings | None = None) -> None:
        self.settings = settings or CanarySettings()
        self._lock = threading.Lock()
        self._stable: str | None = None
        self._candidate: str | None = None
        self._sides: dict[str, SideStats] = {}
        self._tripped = False

    def begin(self, stable: str, candidate: str) -> None:
        with self._lock:
            self._stable, self._candidate, self._tripped = stable, candidate, False
            self._sides = {stable: SideStats(), candidate: SideStats()}

    def end(self) -> None:
        with self._lock:
            self._stable = self._candidate = None
            self._sides = {}

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        with self._lock:
            return {version: side.summary() for version, side in self._sides.items()}

    def observe(self, version: str, outcome: ServedOutcome, ms: float) -> Trip | None:
        """Count one response of ``version``; the rail it trips, if it trips one now."""
        with self._lock:
            side = self._sides.get(version)
            if side is None:
                return None
            side.add(outcome, ms)
            if not self.settings.canary_guard or self._tripped or version != self._candidate:
                return None
            trip = self._request_rails()
            self._tripped = trip is not None
            return trip

    def _request_rails(self) -> Trip | None:
        cfg = self.settings
        stable, candidate = self._sides[self._stable], self._sides[self._candidate]
        if min(stable.requests, candidate.requests) < cfg.canary_min_requests:
            return None
        for rail, attr, margin in ((GuardRail.ERRORS, "errors", cfg.canary_max_error_excess),
                                   (GuardRail.DEGRADED, "degraded", cfg.canary_max_degraded_excess)):
            c, s = candidate.share(getattr(candidate, attr)), stable.share(getattr(stable, attr))
            if c > s + margin:
                return Trip(rail, f"{attr} share {c:.2%} over {candidate.requests} requests exceeds the stable "
                                  f"version's {s:.2%} by more than {margin:.2%}")
        c99, s99 = candidate.p99(), stable.p99()
        if c99 is not None and s99 is not None and c99 > s99 + cfg.canary_max_p99_excess_ms:
            return Trip(GuardRail.LATENCY, f"p99 latency {c99:.1f} ms exceeds the stable version's {s99:.1f} ms "
                                           f"by more than {cfg.canary_max_p99_excess_ms:g} ms")
        return None

    def observe_online(self, metrics: Mapping[str, VersionMetrics]) -> Trip | None:
        """The online AUC rail over the latest window metrics; the trip, if it trips now."""
        with self._lock:
            if not self.settings.canary_guard or self._tripped or self._candidate is None:
                return None
            stable, candidate = metrics.get(self._stable), metrics.get(self._candidate)
            if stable is None or candidate is None or stable.auc is None or candidate.auc is None:
                return None
            if min(stable.labels, candidate.labels) < self.settings.canary_min_labels:
                return None
            if candidate.auc < stable.auc - self.settings.canary_max_auc_drop:
                self._tripped = True
                return Trip(GuardRail.ONLINE_AUC, f"online AUC {candidate.auc:.4f} over {candidate.labels} labels is "
                                                  f"below the stable version's {stable.auc:.4f} "
                                                  f"({stable.labels} labels) by more than "
                                                  f"{self.settings.canary_max_auc_drop:g}")
            return None
