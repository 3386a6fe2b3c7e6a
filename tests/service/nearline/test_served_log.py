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
from service.nearline.served_log import Label, ServedLog, ServedLogOutcome, ServedScore, shard_of
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
    assert 200 <= sync_redis.xlen(log.stream_keys[0]) <= 200 + node  # MAXLEN ~ trims whole nodes


async def test_entries_past_the_age_cap_are_trimmed(client, sync_redis, redis_prefix):
    log = ServedLog(client, OnlineSettings(served_log_max_age_s=60), prefix=redis_prefix)
    old_ms = int(time.time() * 1000) - 3_600_000
    for i in range(300):  # three full nodes of entries an hour old
        sync_redis.xadd(log.stream_keys[0], {"i": i}, id=f"{old_ms}-{i}")
    await log.write([served("u1", 1)])
    node = int(sync_redis.config_get("stream-node-max-entries")["stream-node-max-entries"])
    remaining_old = len(sync_redis.xrange(log.stream_keys[0], max=str(old_ms)))
    assert remaining_old < node  # MINID ~ drops every whole node older than the cap
    assert sync_redis.xrevrange(log.stream_keys[0], count=1)[0][1][b"u"] == b"u1"


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
    assert [(lab.served.item, lab.served.score, lab.label) for lab in rows.labels] == [(1, 0.8, 1), (2, 0.2, 0)]
    await log.add_labels([Label(served("u", 3, version="v2", shadow=True), 1, now)])
    newer = await log.read_labels(rows.cursor)
    assert [(lab.served.item, lab.served.version, lab.served.shadow) for lab in newer.labels] == [(3, "v2", True)]


async def test_one_shard_keeps_one_stream_of_each_under_its_plain_name(client):
    log = ServedLog(client, prefix="p:")
    assert log.stream_keys == ("p:online:served",) and log.labels_keys == ("p:online:labels",)
    sharded = ServedLog(client, OnlineSettings(served_log_shards=3), prefix="p:")
    assert sharded.stream_keys == ("p:{online:served:0}", "p:{online:served:1}", "p:{online:served:2}")
    assert sharded.labels_keys == ("p:{online:labels:0}", "p:{online:labels:1}", "p:{online:labels:2}")


@pytest.mark.both_redis
async def test_shards_split_by_user_and_each_keeps_its_share_of_the_length_cap(redis_client, redis_target,
                                                                              redis_prefix):
    log = ServedLog(redis_client, OnlineSettings(served_log_max_len=400, served_log_shards=4), prefix=redis_prefix)
    for batch in range(20):
        await log.write([served(f"u{batch}-{i}", i) for i in range(50)])
    sync = redis_target.client()
    try:
        for shard, key in enumerate(log.stream_keys):
            entries = sync.xrange(key)
            assert 100 <= len(entries) <= 200  # 400 / 4 each, MAXLEN ~ trims whole nodes (100 entries)
            assert {shard_of(fields[b"u"].decode(), 4) for _, fields in entries} == {shard}
        if redis_target.cluster:  # each shard its own slot
            assert len({sync.keyslot(key) for key in log.stream_keys}) == 4
    finally:
        sync.close()


@pytest.mark.both_redis
async def test_labels_of_every_shard_merge_in_order_and_page_by_cursor(redis_client, redis_prefix):
    log = ServedLog(redis_client, OnlineSettings(served_log_shards=4), prefix=redis_prefix)
    now = int(time.time() * 1000)
    for i in range(30):
        await log.add_labels([Label(served(f"user{i}", i, score=i / 30), i % 2, now)])
    seen, stamps, cursor = [], [], ""
    for _ in range(10):
        batch = await log.read_labels(cursor, count=7)
        seen += [lab.served.item for lab in batch.labels]
        stamps += [lab.at_ms for lab in batch.labels]
        cursor = batch.cursor
        if len(batch.labels) < 7:
            break
    # Each label once, oldest first by the millisecond (shards number their entries independently,
    # so labels of one millisecond come shard by shard).
    assert sorted(seen) == list(range(30)) and len(seen) == 30 and stamps == sorted(stamps)
    assert len(cursor.split(",")) == 4 and (await log.read_labels(cursor)).labels == []
