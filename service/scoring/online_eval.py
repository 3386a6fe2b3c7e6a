"""Online evaluation: events label the scores served before them; metrics per version follow.

An event (user, item, rating) that arrives within the label window of a score served to the
same user for the same item labels it, with the training rule (label = rating above the
dataset's threshold, read from the served version's ``dataset.json``); a shadow score of the
same request is labelled by the same event. Labels go to a Redis stream, so every gateway
sharing Redis sees every label; each gateway reads the new ones incrementally and recomputes,
at most every ``online_eval_interval_s``, AUC, LogLoss and calibration per version over the sliding window
(sklearn's metrics, as offline). ``report`` reads the window from Redis again, bucketed in time,
for ``reclora online-report``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum

import numpy as np
from redis.exceptions import RedisError
from sklearn.metrics import log_loss, roc_auc_score

from service.config import OnlineSettings
from service.logging import BurstLog
from service.nearline.served_log import Label, ServedLog
from service.scoring.contracts import OnlineReport, VersionMetrics
from service.tasks import raise_if_cancelled
from service.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)
burst = BurstLog(log)
EPS = 1e-7  # probabilities clipped as training.metrics clips them
READ_BATCH = 10_000


def version_metrics(version: str, scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
                    ) -> VersionMetrics:
    """AUC, LogLoss and calibration of one version's labelled scores."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1 - EPS)
    n, positives = len(y), int(y.sum())
    if n == 0:
        return VersionMetrics(version, 0, 0, None, None, None, None)
    auc = float(roc_auc_score(y, p)) if 0 < positives < n else None
    return VersionMetrics(version, n, positives, auc, float(log_loss(y, p, labels=[0, 1])), float(p.mean()),
                          positives / n)


def metrics_by_version(labels: Iterable[Label]) -> dict[str, VersionMetrics]:
    groups: dict[str, tuple[list[float], list[int]]] = {}
    for lab in labels:
        scores, ys = groups.setdefault(lab.served.version, ([], []))
        scores.append(lab.served.score)
        ys.append(lab.label)
    return {v: version_metrics(v, s, y) for v, (s, y) in sorted(groups.items())}


class LabelOutcome(StrEnum):
    """Behaviours joined with served scores, by outcome."""

    JOINED = "joined"
    UNMATCHED = "unmatched"  # no score served for the item
    EXPIRED = "expired"  # served before the label window
    ERROR = "error"


class OnlineEvaluator:
    """The ``OnlineEvaluation`` of the service (``service.scoring.contracts``)."""

    def __init__(self, log: ServedLog, settings: OnlineSettings | None = None, *,
                 threshold_of: Callable[[str], float], telemetry: Telemetry = NO_TELEMETRY,
                 on_refresh: Callable[[dict[str, VersionMetrics]], None] = lambda by_version: None) -> None:
        """``settings``: the window, its size and how often it is recomputed; the label window is
        the served-score log's. ``on_refresh`` receives every recomputed window (the metrics'
        gauges and the canary's online guard rail read it)."""
        self.served, self.threshold_of = log, threshold_of
        self.settings = settings or OnlineSettings()
        self.telemetry, self.on_refresh = telemetry, on_refresh
        # (label ms, version, score, y)
        self._pairs: deque[tuple[int, str, float, int]] = deque(maxlen=self.settings.online_max_labels)
        self._last_id = ""
        self._wake = asyncio.Event()
        self._joins: set[asyncio.Task] = set()
        self.latest: dict[str, VersionMetrics] = {}

    # -- labels -----------------------------------------------------------------------------

    def observe(self, user_id: str, events: Sequence[tuple[int, float]]) -> None:
        """Join the events with the user's served scores in a task: the event's answer waits for none of it."""
        if not events:
            return
        task = asyncio.get_running_loop().create_task(self.join(user_id, events))
        self._joins.add(task)
        task.add_done_callback(self._joins.discard)

    async def join(self, user_id: str, events: Sequence[tuple[int, float]]) -> list[Label]:
        """Label the scores served to the user for these items within the window; returns the labels."""
        now_ms = int(time.time() * 1000)
        rating_of: dict[int, float] = {}
        for item, rating in events:
            rating_of.setdefault(int(item), float(rating))  # the first behaviour with the item labels it
        try:
            served = await self.served.take(user_id, list(rating_of))
            oldest = now_ms - self.served.settings.online_label_window_s * 1000
            labels = [Label(s, int(rating_of[s.item] > self.threshold_of(s.version)), now_ms)
                      for s in served if s.at_ms >= oldest]
            await self.served.add_labels(labels)
        except (RedisError, OSError) as exc:
            burst.log(logging.WARNING, "online-labels", "labelling served scores failed", error=repr(exc))
            self.telemetry.count(LabelOutcome.ERROR, len(rating_of))
            return []
        except Exception:  # a bundle without a readable threshold, a malformed entry: never the event's failure
            burst.log(logging.ERROR, "online-labels", "labelling served scores failed", exc_info=True)
            self.telemetry.count(LabelOutcome.ERROR, len(rating_of))
            return []
        matched = {s.item for s in served if not s.shadow}
        self.telemetry.count(LabelOutcome.JOINED, len(labels))
        self.telemetry.count(LabelOutcome.EXPIRED, len(served) - len(labels))
        self.telemetry.count(LabelOutcome.UNMATCHED, len(set(rating_of) - matched))
        if labels:
            self._wake.set()
        return labels

    # -- the sliding window -----------------------------------------------------------------

    async def refresh(self) -> dict[str, VersionMetrics]:
        """Read the labels added since the last refresh, drop those past the window, recompute."""
        now_ms = int(time.time() * 1000)
        since = now_ms - int(self.settings.online_window_s * 1000)
        while True:
            batch = await self.served.read_labels(self._last_id, since_ms=since, count=READ_BATCH)
            for lab in batch.labels:
                self._pairs.append((lab.at_ms, lab.served.version, lab.served.score, lab.label))
            self._last_id = batch.cursor
            if len(batch.labels) < READ_BATCH:
                break
        while self._pairs and self._pairs[0][0] < since:
            self._pairs.popleft()
        groups: dict[str, tuple[list[float], list[int]]] = {}
        for _, version, score, y in self._pairs:
            scores, ys = groups.setdefault(version, ([], []))
            scores.append(score)
            ys.append(y)
        self.latest = {v: version_metrics(v, s, y) for v, (s, y) in sorted(groups.items())}
        return self.latest

    async def run(self) -> None:
        """Refresh after new labels, at most once per ``online_eval_interval_s`` (and at least every second
        interval, so the window slides without traffic); hand each result to ``on_refresh``."""
        while True:
            raise_if_cancelled()  # a stop request a Redis call lost still ends the loop
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.online_eval_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            started = time.monotonic()
            try:
                self.on_refresh(await self.refresh())
            except (RedisError, OSError) as exc:
                burst.log(logging.WARNING, "online-refresh", "online metrics not refreshed", error=repr(exc))
            except Exception:
                burst.log(logging.ERROR, "online-refresh", "online metrics not refreshed", exc_info=True)
            await asyncio.sleep(max(self.settings.online_eval_interval_s - (time.monotonic() - started), 0.0))

    async def report(self, window_s: float | None = None, bucket_s: float = 60.0) -> OnlineReport:
        """The last ``window_s`` of labels from Redis: metrics per version, and per time bucket."""
        window = float(window_s or self.settings.online_window_s)
        max_labels = self.settings.online_max_labels
        now_ms = int(time.time() * 1000)
        start_ms = now_ms - int(window * 1000)
        labels: list[Label] = []
        after = ""
        while len(labels) < max_labels:
            batch = await self.served.read_labels(after, since_ms=start_ms, count=min(READ_BATCH, max_labels))
            labels.extend(batch.labels)
            if len(batch.labels) < READ_BATCH:
                break
            after = batch.cursor
        labels = labels[-max_labels:]
        buckets: dict[int, list[Label]] = {}
        for lab in labels:
            buckets.setdefault(int((lab.at_ms - start_ms) // (bucket_s * 1000)), []).append(lab)
        series = [(start_ms / 1000 + b * bucket_s, m) for b in sorted(buckets)
                  for m in metrics_by_version(buckets[b]).values()]
        return OnlineReport(window, bucket_s, list(metrics_by_version(labels).values()), series)

    async def drain(self) -> None:
        """Wait for the label joins in flight (tests, shutdown)."""
        if self._joins:
            await asyncio.gather(*list(self._joins), return_exceptions=True)
