"""The canary's guard rails: each trips past its margin over the minimum, not before, and once."""

from __future__ import annotations

import pytest

from service.config import CanarySettings
from service.registry.guard import CanaryGuard, GuardRail
from service.scoring.contracts import ServedOutcome, VersionMetrics

OK, DEGRADED, ERROR = ServedOutcome.OK, ServedOutcome.DEGRADED, ServedOutcome.ERROR
CONFIG = CanarySettings(canary_min_requests=100, canary_max_error_excess=0.02, canary_max_degraded_excess=0.05,
                        canary_max_p99_excess_ms=20.0, canary_min_labels=50, canary_max_auc_drop=0.03)


def guard() -> CanaryGuard:
    g = CanaryGuard(CONFIG)
    g.begin("v1", "v2")
    return g


def feed(g: CanaryGuard, version: str, n: int, outcome=OK, ms: float = 10.0, every: int = 1, bad=ERROR):
    """``n`` responses of ``version``, every ``every``-th one ``bad``; returns the first trip."""
    for i in range(n):
        trip = g.observe(version, bad if (i + 1) % every == 0 and every > 1 else outcome, ms)
        if trip is not None:
            return trip, i + 1
    return None, n


def test_the_error_rail_trips_at_the_minimum_when_past_the_margin():
    g = guard()
    assert feed(g, "v1", 100, every=50)[0] is None  # stable: 2 % errors
    trip, at = feed(g, "v2", 200, every=20)  # candidate: 5 % errors
    assert trip.rail is GuardRail.ERRORS and at == CONFIG.canary_min_requests
    assert "5.00%" in trip.reason and "2.00%" in trip.reason
    assert feed(g, "v2", 50, every=2)[0] is None  # a rail trips once


def test_within_the_margin_nothing_trips():
    g = guard()
    feed(g, "v1", 200, every=50)
    assert feed(g, "v2", 300, every=30)[0] is None  # 3.3 % against 2 %: within 2 points


def test_nothing_trips_before_both_sides_have_the_minimum():
    g = guard()
    feed(g, "v1", 99)
    assert feed(g, "v2", 500, outcome=ERROR)[0] is None
    assert g.observe("v1", OK, 10.0) is None  # the stable side reaches the minimum
    trip = g.observe("v2", ERROR, 10.0)
    assert trip is not None and trip.rail is GuardRail.ERRORS


def test_the_degraded_and_latency_rails():
    g = guard()
    feed(g, "v1", 100, every=10, bad=DEGRADED)  # 10 %
    trip, _ = feed(g, "v2", 100, every=5, bad=DEGRADED)  # 20 %
    assert trip.rail is GuardRail.DEGRADED
    g = guard()
    feed(g, "v1", 100, ms=30.0)
    assert feed(g, "v2", 100, ms=45.0)[0] is None  # 15 ms slower: within 20
    g = guard()
    feed(g, "v1", 100, ms=30.0)
    trip, _ = feed(g, "v2", 100, ms=60.0)
    assert trip.rail is GuardRail.LATENCY and "60.0 ms" in trip.reason


def metrics(version: str, labels: int, auc: float | None) -> VersionMetrics:
    return VersionMetrics(version, labels, labels // 2, auc, 0.6, 0.5, 0.5)


def test_the_online_auc_rail_needs_enough_labels_on_both_sides():
    g = guard()
    assert g.observe_online({"v1": metrics("v1", 49, 0.80), "v2": metrics("v2", 500, 0.40)}) is None
    assert g.observe_online({"v1": metrics("v1", 500, 0.80), "v2": metrics("v2", 500, 0.78)}) is None
    assert g.observe_online({"v1": metrics("v1", 500, 0.80), "v2": metrics("v2", 500, None)}) is None
    trip = g.observe_online({"v1": metrics("v1", 500, 0.80), "v2": metrics("v2", 60, 0.70)})
    assert trip.rail is GuardRail.ONLINE_AUC and "0.7000" in trip.reason
    assert g.observe_online({"v1": metrics("v1", 500, 0.80), "v2": metrics("v2", 60, 0.10)}) is None  # once


def test_other_versions_and_a_disabled_guard_are_ignored():
    g = guard()
    assert feed(g, "v0", 500, outcome=ERROR)[0] is None
    assert g.stats()["v2"]["requests"] == 0 and "v0" not in g.stats()
    off = CanaryGuard(CONFIG.model_copy(update={"canary_guard": False}))
    off.begin("v1", "v2")
    feed(off, "v1", 200)
    assert feed(off, "v2", 200, outcome=ERROR)[0] is None
    assert off.stats()["v2"]["error_share"] == pytest.approx(1.0)
    g.end()
    assert g.stats() == {} and g.observe("v2", ERROR, 1.0) is None
