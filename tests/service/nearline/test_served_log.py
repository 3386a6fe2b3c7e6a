"""The served-score log on the real Redis: bounded by length and age, off the request path,
joined exactly (same user, same item, once)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis
from tests.redis_support import REDIS_URL

from service.config import OnlineSettings
from service.nearline.served_log import Label, ServedLog, ServedLogOutcome, ServedScore
from tests.telemetry_support import RecordedTelemetry

pytestmark = pytest.mark.anyio
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


def served(user: str, item: int, *, version: str = "v1", score: float = 0.5, shadow: bool = False,
           at_ms: int | None = None, request_id: str = "r1") -> ServedScore:
    return ServedScore(request_id, user, item, version, score, None, 0.25, at_ms or int(time.time() * 1000), shadow)


@pytest.fixture
async def client():
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


@pytest.fixture
def sync_redis():
    r = redis.Redis.from_url(REDIS_URL)
    yield r
    r.close()


async def test_the_stream_stays_within_its_length_cap(client, sync_redis, redis_prefix):
    log = ServedLog(client, OnlineSettings(served_log_max_len=200), prefix=redis_prefix)
    for batch in range(20):
        await log.write([served(f"u{batch}", i) for i in range(50)])
    node = int(sync_redis.config_get("stream-node-max-entries")["stream-node-max-entries"])
    assert 200 <= sync_redis.xlen(log.stream_key) <= 200 + node  # MAXLEN ~ trims whole nodes


async def test_entries_past_the_age_cap_are_trimmed(client, sync_redis, redis_prefix):
    log = ServedLog(client, OnlineSettings(served_log_max_age_s=60), prefix=redis_prefix)
    old_ms = int(time.time() * 1000) - 3_600_000
    for i in range(300):  # three full nodes of entries an hour old
        sync_redis.xadd(log.stream_key, {"i": i}, id=f"{old_ms}-{i}")
    await log.write([served("u1", 1)])
    node = int(sync_redis.config_get("stream-node-max-entries")["stream-node-max-entries"])
    remaining_old = len(sync_redis.xrange(log.stream_key, max=str(old_ms)))
    assert remaining_old < node  # MINID ~ drops every whole node older than the cap
    assert sync_redis.xrevrange(log.stream_key, count=1)[0][1][b"u"] == b"u1"


async def test_a_join_takes_only_the_same_user_and_item_and_only_once(client, redis_prefix):
    log = ServedLog(client, prefix=redis_prefix)
    await log.write([served("alice", 7, score=0.9, request_id="a"), served("alice", 8, score=0.1),
                     served("bob", 9, score=0.3), served("alice", 7, version="v2", score=0.7, shadow=True,
                                                         request_id="a")])
    assert await log.take("bob", [7]) == []  # another user's item
    assert await log.take("alice", [9]) == []  # another item of the user
    taken = await log.take("alice", [7, 7])
    assert sorted((s.version, s.score, s.shadow, s.request_id) for s in taken) == [("v1", 0.9, False, "a"),
                                                                                ("v2", 0.7, True, "a")]
    assert await log.take("alice", [7]) == []  # labelled once
    assert [s.item for s in await log.take("alice", [8])] == [8]


async def test_the_per_user_index_expires_with_the_label_window(client, sync_redis, redis_prefix):
    log = ServedLog(client, OnlineSettings(online_label_window_s=30), prefix=redis_prefix)
    await log.write([served("carol", 1)])
    assert 0 < sync_redis.ttl(log.user_key("carol")) <= 30


async def test_offer_drops_past_its_queue_and_counts(client, redis_prefix):
    telemetry = RecordedTelemetry()
    log = ServedLog(client, OnlineSettings(served_log_queue=2), prefix=redis_prefix, telemetry=telemetry)
    results = [log.offer([served("dave", i), served("dave", i + 100)]) for i in range(5)]  # no await: no drain yet
    assert results == [True, True, False, False, False]
    await log.flush()
    counts = {o.value: telemetry.total(o) for o in (ServedLogOutcome.WRITTEN, ServedLogOutcome.DROPPED)}
    assert counts == {"written": 4, "dropped": 6}
    assert [s.item for s in await log.take("dave", [0, 1, 2])] == [0, 1]
    log.close()


async def test_a_dead_redis_fails_the_write_never_the_caller(redis_prefix):
    telemetry = RecordedTelemetry()
    dead = aioredis.Redis.from_url(DEAD_REDIS_URL, socket_connect_timeout=0.2)
    log = ServedLog(dead, prefix=redis_prefix, telemetry=telemetry)
    start = time.perf_counter()
    assert log.offer([served("erin", 1), served("erin", 2)])
    assert time.perf_counter() - start < 0.01  # the caller only queued
    await asyncio.wait_for(log.flush(), 5)
    failed = [n for outcome, n, _ in telemetry.counts if outcome is ServedLogOutcome.FAILED]
    assert failed == [2]
    log.close()
    await dead.aclose()


async def test_labels_round_trip_and_read_incrementally(client, redis_prefix):
    log = ServedLog(client, prefix=redis_prefix)
    now = int(time.time() * 1000)
    await log.add_labels([Label(served("u", 1, score=0.8), 1, now), Label(served("u", 2, score=0.2), 0, now)])
    rows = await log.read_labels()
    assert [(lab.served.item, lab.served.score, lab.label) for _, lab in rows] == [(1, 0.8, 1), (2, 0.2, 0)]
    await log.add_labels([Label(served("u", 3, version="v2", shadow=True), 1, now)])
    newer = await log.read_labels(rows[-1][0])
    assert [(lab.served.item, lab.served.version, lab.served.shadow) for _, lab in newer] == [(3, "v2", True)]
