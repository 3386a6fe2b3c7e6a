"""Every served score in Redis, written off the request path, and the labels events give them.

Keys (the user's hash tag keeps their keys on one Redis Cluster slot):

- ``<prefix>online:served``: STREAM of served scores (request id, user, item, version, score,
  LLM and CRM score, time, shadow flag), capped by length (``XADD MAXLEN ~``) and age
  (``XTRIM MINID ~``): the audit trail of what each version answered. With ``served_log_shards``
  N > 1 it is N streams ``<prefix>{online:served:<i>}`` (each its own hash tag, so a cluster
  spreads them over its masters), a user's scores in shard ``shard_of(user)``; each shard keeps
  ``served_log_max_len / N`` entries and the age cap, so the whole log keeps its bounds;
- ``<prefix>{u:<user_id>}:served``: HASH, item -> the score last served to that user for it
  (field ``<item>``) and the candidate's shadow score (``<item>|shadow``), expiring one label
  window after the last write: the join of an event with its served score is one round trip
  that reads and deletes the fields at once, so an event labels a served score at most once;
- ``<prefix>online:labels``: STREAM of labelled scores (version, score, label, served time),
  capped by length and by the evaluation window; sharded like the served scores
  (``<prefix>{online:labels:<i>}``, ``online_max_labels / N`` each), readers merge the shards.

A response hands its scores to ``offer`` (a bounded queue; full = dropped and counted) and one
writer task drains the queue in pipelined batches: a slow or failed Redis write never delays or
fails a response.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from redis.exceptions import RedisError

from service.config import OnlineSettings
from service.history.clients import AsyncRedis, pipeline
from service.history.layout import user_tag
from service.logging import BurstLog
from service.tasks import raise_if_cancelled
from service.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)
burst = BurstLog(log)
SHADOW_SUFFIX = "|shadow"


@dataclass(frozen=True, slots=True)
class ServedScore:
    request_id: str
    user_id: str
    item: int
    version: str
    score: float
    llm_score: float | None
    crm_score: float
    at_ms: int  # Unix milliseconds when it was answered (or, shadowed, scored)
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Label:
    """A served score and what the user did with the item afterwards."""

    served: ServedScore
    label: int  # 1: rating above the dataset's threshold
    at_ms: int  # when the event arrived


class ServedLogOutcome(StrEnum):
    """What became of served scores offered to the log."""

    WRITTEN = "written"
    DROPPED = "dropped"  # the writer's queue was full
    FAILED = "failed"  # Redis refused or timed out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def shard_keys(prefix: str, name: str, shards: int) -> tuple[str, ...]:
    """The stream keys of ``name``: ``<prefix>online:<name>`` alone, or one hash-tagged key per shard."""
    if shards == 1:
        return (f"{prefix}online:{name}",)
    return tuple(f"{prefix}{{online:{name}:{i}}}" for i in range(shards))


def shard_of(user_id: str, shards: int) -> int:
    """The shard of a user's entries: a hash of the id that is the same in every process and release."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


@dataclass(frozen=True)
class LabelBatch:
    """Labels read from every shard, oldest first, and the cursor to read on after them."""

    labels: list[Label]
    cursor: str


class ServedLog:
    """The stream's bounds, the label window and the labels' bounds (the online evaluation's
    window and size) come from ``settings``."""

    def __init__(self, client: AsyncRedis, settings: OnlineSettings | None = None, *, prefix: str = "",
                 batch: int = 32, telemetry: Telemetry = NO_TELEMETRY) -> None:
        if batch < 1:
            raise ValueError("served log batches must be at least 1")
        self._redis, self.prefix = client, prefix
        self.settings = settings or OnlineSettings()
        self.batch = batch
        self.telemetry = telemetry
        shards = self.settings.served_log_shards
        self.stream_keys = shard_keys(prefix, "served", shards)
        self.labels_keys = shard_keys(prefix, "labels", shards)
        self._stream_len = max(self.settings.served_log_max_len // shards, 1)
        self._labels_len = max(self.settings.online_max_labels // shards, 1)
        self._queue: asyncio.Queue[list[ServedScore]] | None = None
        self._writer: asyncio.Task | None = None

    def user_key(self, user_id: str) -> str:
        return f"{user_tag(self.prefix, user_id)}:served"

    def shard(self, user_id: str) -> int:
        """The index of the user's stream in ``stream_keys`` (and ``labels_keys``)."""
        return shard_of(user_id, len(self.stream_keys)) if len(self.stream_keys) > 1 else 0

    # -- the request side -------------------------------------------------------------------

    def offer(self, scores: Sequence[ServedScore]) -> bool:
        """Queue one response's scores for the writer (event loop only); False when dropped."""
        if not scores:
            return True
        if self._queue is None:
            self._queue = asyncio.Queue(self.settings.served_log_queue)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain(), name="served-log")
        try:
            self._queue.put_nowait(list(scores))
        except asyncio.QueueFull:
            self.telemetry.count(ServedLogOutcome.DROPPED, len(scores))
            return False
        return True

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or failed): for tests and shutdown."""
        if self._queue is not None and self._writer is not None and not self._writer.done():
            await self._queue.join()

    def close(self) -> None:
        """Stop the writer; what it had not written yet is counted as dropped."""
        if self._writer is not None:
            self._writer.cancel()
        while self._queue is not None and not self._queue.empty():
            self.telemetry.count(ServedLogOutcome.DROPPED, len(self._queue.get_nowait()))

    async def _drain(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            raise_if_cancelled()  # a stop request a Redis write lost still ends the writer
            batches = [await queue.get()]
            while len(batches) < self.batch and not queue.empty():
                batches.append(queue.get_nowait())
            scores = [s for b in batches for s in b]
            try:
                await self.write(scores)
                self.telemetry.count(ServedLogOutcome.WRITTEN, len(scores))
            except (RedisError, OSError) as exc:
                burst.log(logging.WARNING, "served-log", "served-score log write failed; those scores are not "
                          "recorded", error=repr(exc))
                self.telemetry.count(ServedLogOutcome.FAILED, len(scores))
            finally:
                for _ in batches:
                    queue.task_done()

    async def write(self, scores: Sequence[ServedScore]) -> None:
        """Append to the user's shard of the stream, trim every shard by length and age, and index
        each score per user for the label join (one pipelined round trip)."""
        now_ms = int(time.time() * 1000)
        per_user: dict[str, dict[str, str]] = {}
        async with pipeline(self._redis) as pipe:
            for s in scores:
                pipe.xadd(self.stream_keys[self.shard(s.user_id)], {
                    "r": s.request_id, "u": s.user_id, "i": s.item, "v": s.version, "s": repr(s.score),
                    "l": "" if s.llm_score is None else repr(s.llm_score), "c": repr(s.crm_score), "t": s.at_ms,
                    "sh": int(s.shadow)}, maxlen=self._stream_len, approximate=True)
                field = f"{s.item}{SHADOW_SUFFIX}" if s.shadow else str(s.item)
                per_user.setdefault(s.user_id, {})[field] = json.dumps(
                    [s.version, s.score, s.at_ms, s.request_id, s.llm_score, s.crm_score])
            for key in self.stream_keys:
                pipe.xtrim(key, minid=now_ms - self.settings.served_log_max_age_s * 1000, approximate=True)
            for user_id, fields in per_user.items():
                key = self.user_key(user_id)
                pipe.hset(key, mapping=fields)
                pipe.expire(key, self.settings.online_label_window_s)
            await pipe.execute()

    # -- the event side ---------------------------------------------------------------------

    async def take(self, user_id: str, items: Sequence[int]) -> list[ServedScore]:
        """The scores last served (and shadowed) to the user for ``items``, removed in the same
        transaction so that no other event labels them again."""
        if not items:
            return []
        fields = [f for item in dict.fromkeys(items) for f in (str(item), f"{item}{SHADOW_SUFFIX}")]
        key = self.user_key(user_id)
        async with pipeline(self._redis, transaction=True) as pipe:
            pipe.hmget(key, fields)
            pipe.hdel(key, *fields)
            values, _ = await pipe.execute()
        out = []
        for field, value in zip(fields, values):
            if value is None:
                continue
            version, score, at_ms, request_id, llm, crm = json.loads(value)
            item = int(field.removesuffix(SHADOW_SUFFIX))
            out.append(ServedScore(request_id, user_id, item, version, float(score), llm, float(crm), int(at_ms),
                                   field.endswith(SHADOW_SUFFIX)))
        return out

    async def add_labels(self, labels: Sequence[Label]) -> None:
        if not labels:
            return
        now_ms = int(time.time() * 1000)
        async with pipeline(self._redis) as pipe:
            for lab in labels:
                s = lab.served
                pipe.xadd(self.labels_keys[self.shard(s.user_id)], {
                    "v": s.version, "s": repr(s.score), "y": lab.label, "t": s.at_ms, "sh": int(s.shadow),
                    "u": s.user_id, "i": s.item, "r": s.request_id}, maxlen=self._labels_len, approximate=True)
            for key in self.labels_keys:
                pipe.xtrim(key, minid=now_ms - self.settings.online_window_s * 1000, approximate=True)
            await pipe.execute()

    async def read_labels(self, after: str = "", *, since_ms: int | None = None, count: int = 10_000) -> LabelBatch:
        """Labels after ``after`` (a previous batch's cursor; "" to start) or from ``since_ms`` on,
        oldest first, at most ``count``, merged from every shard. The cursor is the last stream id
        read from each shard, comma-separated (one shard: just that id)."""
        keys = self.labels_keys
        cursors = after.split(",") if after not in ("-", "") else [""] * len(keys)
        if len(cursors) != len(keys):
            raise ValueError(f"a label cursor of {len(cursors)} shards for {len(keys)} shards")
        start = str(since_ms) if since_ms is not None else "-"
        async with pipeline(self._redis) as pipe:
            for key, cursor in zip(keys, cursors):
                pipe.xrange(key, min=f"({cursor}" if cursor else start, max="+", count=count)
            per_shard = await pipe.execute()
        rows = sorted(((_stream_id(entry), shard, _text(entry), fields)
                       for shard, entries in enumerate(per_shard) for entry, fields in entries))[:count]
        out = []
        for _, shard, entry, fields in rows:
            cursors[shard] = entry
            f = {_text(k): _text(v) for k, v in fields.items()}
            served = ServedScore(f["r"], f["u"], int(f["i"]), f["v"], float(f["s"]), None, float("nan"), int(f["t"]),
                                 f["sh"] == "1")
            out.append(Label(served, int(f["y"]), int(entry.split("-")[0])))
        return LabelBatch(out, ",".join(cursors) if out else after)


def _stream_id(entry: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(entry).partition("-")
    return int(ms), int(seq or 0)
