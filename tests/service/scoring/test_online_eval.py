"""Online evaluation on the real Redis: the label rule and window of the join, the sliding
window of the metrics, and metrics equal to sklearn's on the same pairs."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from service.config import OnlineSettings
from service.nearline.served_log import ServedLog, ServedScore
from service.scoring.online_eval import OnlineEvaluator, version_metrics
from tests.telemetry_support import RecordedTelemetry

pytestmark = [pytest.mark.anyio, pytest.mark.both_redis]  # the single node and the cluster


@pytest.fixture(params=[1, 4], ids=["one-stream", "4-shards"])
async def log(request, redis_client, redis_prefix):
    """The served log as one stream (the default) and split over 4 shards, which readers merge."""
    return ServedLog(redis_client, OnlineSettings(online_label_window_s=60, served_log_shards=request.param),
                     prefix=redis_prefix)


def served(user: str, item: int, score: float, version: str = "v1", age_s: float = 0.0) -> ServedScore:
    return ServedScore("r", user, item, version, score, None, score, int((time.time() - age_s) * 1000))


class OutcomeCounts(RecordedTelemetry):
    """Counted label outcomes summed into ``into`` by outcome."""

    def __init__(self, into: dict) -> None:
        super().__init__()
        self.into = into

    def count(self, outcome, n=1, *, on=None) -> None:
        super().count(outcome, n, on=on)
        self.into[outcome] = self.into.get(outcome, 0) + n


def evaluator(log: ServedLog, outcomes: dict | None = None, **kwargs) -> OnlineEvaluator:
    counts = outcomes if outcomes is not None else {}
    return OnlineEvaluator(log, threshold_of=lambda version: 3.0, telemetry=OutcomeCounts(counts), **kwargs)


async def test_the_label_is_the_training_rule_and_joins_within_the_window(log):
    outcomes: dict[str, int] = {}
    online = evaluator(log, outcomes)
    await log.write([served("u1", 1, 0.9), served("u1", 2, 0.4), served("u1", 3, 0.7, age_s=61),
                     served("u2", 4, 0.6)])
    labels = await online.join("u1", [(1, 4.0), (2, 3.0), (3, 5.0), (4, 5.0), (1, 1.0)])
    assert sorted((lab.served.item, lab.label) for lab in labels) == [(1, 1), (2, 0)]  # rating > 3; first event
    assert outcomes == {"joined": 2, "expired": 1, "unmatched": 1}  # item 3 too old; item 4 is u2's
    assert await online.join("u1", [(1, 5.0)]) == []  # a served score is labelled once


async def test_metrics_equal_sklearns_on_the_same_pairs(log):
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.01, 0.99, 400)
    labels = (rng.uniform(size=400) < scores).astype(int)
    m = version_metrics("v1", scores, labels)
    assert m.labels == 400 and m.positives == labels.sum()
    assert m.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m.logloss == pytest.approx(log_loss(labels, scores), abs=1e-12)
    assert (m.mean_predicted, m.positive_rate) == (pytest.approx(scores.mean()), pytest.approx(labels.mean()))
    one_class = version_metrics("v1", [0.2, 0.3], [1, 1])
    assert one_class.auc is None and one_class.logloss is not None
    assert version_metrics("v1", [], []).labels == 0


async def test_the_window_reads_incrementally_and_forgets_old_labels(log):
    online = evaluator(log, settings=OnlineSettings(online_window_s=60))
    users = [f"u{i}" for i in range(40)]
    await log.write([served(u, 1, 0.2 + 0.6 * (i % 2), version="v1" if i < 20 else "v2") for i, u in enumerate(users)])
    for i, u in enumerate(users):
        await online.join(u, [(1, 5.0 if i % 2 else 1.0)])
    first = await online.refresh()
    assert {v: (m.labels, m.auc) for v, m in first.items()} == {"v1": (20, 1.0), "v2": (20, 1.0)}
    await log.write([served("late", 1, 0.9, version="v2")])
    await online.join("late", [(1, 1.0)])
    second = await online.refresh()
    assert second["v2"].labels == 21 and second["v2"].auc < 1.0 and second["v1"].labels == 20
    online._pairs = type(online._pairs)((t - 120_000, v, s, y) for t, v, s, y in online._pairs)  # two minutes on
    assert await online.refresh() == {}


async def test_run_refreshes_after_labels_and_the_report_buckets_them(log):
    seen: list[dict] = []
    online = OnlineEvaluator(log, OnlineSettings(online_eval_interval_s=0.05), threshold_of=lambda v: 3.0,
                             on_refresh=seen.append)
    runner = asyncio.get_running_loop().create_task(online.run())
    try:
        await log.write([served("a", 1, 0.8), served("b", 1, 0.3)])
        online.observe("a", [(1, 5.0)])
        online.observe("b", [(1, 2.0)])
        await online.drain()
        deadline = time.monotonic() + 5
        while not (seen and "v1" in seen[-1] and seen[-1]["v1"].labels == 2):
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
        assert seen[-1]["v1"].auc == 1.0
    finally:
        runner.cancel()
    report = await online.report(window_s=600, bucket_s=60)
    assert [(m.version, m.labels) for m in report.versions] == [("v1", 2)]
    assert sum(m.labels for _, m in report.series) == 2 and report.window_s == 600


async def test_run_stops_whenever_it_is_cancelled_even_inside_a_redis_call(log):
    """A cancel that lands inside a Redis pipeline can be lost by redis-py; the loop still stops."""
    # Refreshing every millisecond (below what the setting admits) so most cancels land inside a Redis call.
    online = evaluator(log, settings=OnlineSettings.model_construct(online_eval_interval_s=0.001))
    rng = np.random.default_rng(0)
    for _ in range(150):
        runner = asyncio.get_running_loop().create_task(online.run())
        await asyncio.sleep(float(rng.uniform(0.0, 0.004)))
        runner.cancel()
        done, _ = await asyncio.wait([runner], timeout=2.0)
        if not done:  # leave nothing running behind a failed assertion
            runner.cancel()
        assert done, "the online evaluation went on after it was cancelled"
