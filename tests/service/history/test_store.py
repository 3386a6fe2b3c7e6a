"""The history store against a real Redis: order, cap, atomicity, one round trip, failure modes.

Every test writes under its own random key prefix and deletes those keys afterwards, so tests
share the server's default db with others safely.
"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from tests.service.history.history_support import make_store, sync_client
from tests.redis_support import REDIS_URL
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.history import (
    Event,
    HistoryFormatError,
    HistoryOrderError,
    HistorySettings,
    HistoryStore,
    bulk_load,
    count_key,
    decode_records,
    encode_records,
    events_key,
    knowledge_key,
    profile_key,
)

pytestmark = pytest.mark.anyio




def events(*triples: tuple[int, float, int]) -> list[Event]:
    return [Event(item, rating, ts) for item, rating, ts in triples]


def test_records_round_trip_and_are_20_bytes() -> None:
    items = np.array([1, 2**40, 7], dtype=np.int64)
    ratings = np.array([4.5, 1.0, 3.0], dtype=np.float32)
    stamps = np.array([10, 20, 2**33], dtype=np.int64)
    records = encode_records(items, ratings, stamps)
    assert [len(r) for r in records] == [20, 20, 20]
    got = decode_records(records)
    for want, have in zip((items, ratings, stamps), got):
        np.testing.assert_array_equal(have, want)
        assert have.dtype == want.dtype and have.flags.writeable and have.flags.c_contiguous


async def test_appends_read_back_oldest_first(prefix) -> None:
    store = make_store(prefix)
    try:
        assert await store.append("u1", events((10, 4.0, 100), (11, 2.0, 100))) == 2
        assert await store.append("u1", events((12, 5.0, 101))) == 3
        assert await store.append("u1", events((13, 1.0, 101), (10, 3.5, 205))) == 5
        assert await store.append("u1", []) == 5
        history = await store.read("u1")
    finally:
        await store.aclose()
    assert history.exists
    np.testing.assert_array_equal(history.items, [10, 11, 12, 13, 10])
    np.testing.assert_array_equal(history.ratings, np.array([4.0, 2.0, 5.0, 1.0, 3.5], np.float32))
    np.testing.assert_array_equal(history.timestamps, [100, 100, 101, 101, 205])
    assert (history.items.dtype, history.ratings.dtype, history.timestamps.dtype) == (np.int64, np.float32, np.int64)


async def test_cap_keeps_the_most_recent_events(prefix) -> None:
    store = make_store(prefix, max_events=5)
    try:
        await store.append("u1", [Event(i, 3.0, i) for i in range(3)])
        assert await store.append("u1", [Event(i, 3.0, i) for i in range(3, 7)]) == 5
        np.testing.assert_array_equal((await store.read("u1")).items, [2, 3, 4, 5, 6])
        assert await store.append("u1", [Event(i, 3.0, i) for i in range(7, 19)]) == 5  # one batch over the cap
        np.testing.assert_array_equal((await store.read("u1")).items, [14, 15, 16, 17, 18])
    finally:
        await store.aclose()
    assert sync_client().llen(events_key(prefix, "u1")) == 5


async def test_large_append_beyond_lua_unpack_limit(prefix) -> None:
    store = make_store(prefix, max_events=20_000)
    try:
        assert await store.append("big", [Event(i, 1.0, i) for i in range(12_000)]) == 12_000
        np.testing.assert_array_equal((await store.read("big")).items, np.arange(12_000))
    finally:
        await store.aclose()


class CountingConnection(aioredis.Connection):
    """Records every write to the socket: one write per round trip (a pipeline writes once)."""

    writes: list[bytes] = []

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, (bytes, str)) else list(command)
        CountingConnection.writes.append(b"".join(c.encode() if isinstance(c, str) else c for c in chunks))
        await super().send_packed_command(chunks, check_health)


async def test_read_is_one_pipelined_round_trip(prefix) -> None:
    pool = aioredis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
    store = HistoryStore(aioredis.Redis(connection_pool=pool), HistorySettings(redis_prefix=prefix))
    try:
        await store.append("u1", events((1, 4.0, 1), (2, 5.0, 2)))
        await store.set_profile("u1", {"age": "25-34"})
        CountingConnection.writes.clear()
        history = await store.read("u1")
        writes = list(CountingConnection.writes)
    finally:
        await store.aclose()
    assert len(writes) == 1
    assert b"LRANGE" in writes[0] and b"HGETALL" in writes[0]
    assert b"MULTI" not in writes[0]  # a plain pipeline, not a transaction
    assert history.items.tolist() == [1, 2] and history.profile == {"age": "25-34"}


async def test_concurrent_appends_lose_nothing_and_never_interleave(prefix) -> None:
    store = make_store(prefix)
    n_tasks, per_task = 50, 6
    try:
        await asyncio.gather(*(
            store.append("hot", [Event(task * 100 + j, 3.0, 1_000) for j in range(per_task)])
            for task in range(n_tasks)))
        history = await store.read("hot")
    finally:
        await store.aclose()
    assert len(history.items) == n_tasks * per_task
    batches = history.items.reshape(n_tasks, per_task)
    tasks = batches // 100
    assert (tasks == tasks[:, :1]).all(), "a batch was interleaved with another append"
    np.testing.assert_array_equal(batches % 100, np.tile(np.arange(per_task), (n_tasks, 1)))
    assert sorted(tasks[:, 0].tolist()) == list(range(n_tasks))


async def test_concurrent_appends_respect_the_cap(prefix) -> None:
    store = make_store(prefix, max_events=40)
    try:
        await asyncio.gather(*(store.append("hot", [Event(t, 3.0, 5)] * 3) for t in range(30)))
    finally:
        await store.aclose()
    assert sync_client().llen(events_key(prefix, "hot")) == 40


async def test_out_of_order_events_are_rejected_and_nothing_is_written(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.append("u1", events((1, 4.0, 100), (2, 4.0, 150)))
        # In order within the call but older than the stored latest: rejected by the script.
        with pytest.raises(HistoryOrderError, match="older than the latest stored event"):
            await store.append("u1", events((3, 4.0, 149), (4, 4.0, 300)))
        # Out of order within the call.
        with pytest.raises(HistoryOrderError):
            await store.append("u1", events((5, 4.0, 400), (6, 4.0, 399)))
        assert await store.append("u1", events((7, 4.0, 150))) == 3  # equal to the latest is fine
        history = await store.read("u1")
    finally:
        await store.aclose()
    assert issubclass(HistoryOrderError, ValueError)
    np.testing.assert_array_equal(history.items, [1, 2, 7])
    np.testing.assert_array_equal(history.timestamps, [100, 150, 150])


async def test_profile_replace_and_merge(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.set_profile("u1", {"age": "18-24", "gender": "F"})
        await store.set_profile("u1", {"occupation": "writer"}, replace=False)
        assert (await store.read("u1")).profile == {"age": "18-24", "gender": "F", "occupation": "writer"}
        await store.set_profile("u1", {"age": "25-34"})
        merged_then_replaced = await store.read("u1")
        await store.set_profile("u1", {})
        cleared = await store.read("u1")
    finally:
        await store.aclose()
    assert merged_then_replaced.profile == {"age": "25-34"} and merged_then_replaced.exists
    assert cleared.profile == {} and not cleared.exists


async def test_unknown_user_reads_as_empty(prefix) -> None:
    store = make_store(prefix)
    try:
        history = await store.read("nobody")
    finally:
        await store.aclose()
    assert not history.exists and history.profile == {}
    assert history.items.shape == history.ratings.shape == history.timestamps.shape == (0,)
    assert (history.items.dtype, history.ratings.dtype, history.timestamps.dtype) == (np.int64, np.float32, np.int64)


async def test_profile_only_user_exists(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.set_profile("new", {"age": "56+"})
        history = await store.read("new")
    finally:
        await store.aclose()
    assert history.exists and len(history.items) == 0


async def test_unreachable_redis_fails_fast() -> None:
    store = HistoryStore.from_settings(HistorySettings(redis_url="redis://127.0.0.1:1/0"))
    try:
        start = time.perf_counter()
        with pytest.raises(RedisConnectionError):
            await store.read("u1")
        with pytest.raises(RedisConnectionError):
            await store.append("u1", events((1, 4.0, 1)))
        assert await store.ping() is False
        assert time.perf_counter() - start < 2.0
    finally:
        await store.aclose()


async def test_hung_redis_fails_within_the_socket_timeout() -> None:
    """A server that accepts connections but never answers costs about one socket timeout."""
    with socket.create_server(("127.0.0.1", 0)) as hung:
        port = hung.getsockname()[1]
        store = HistoryStore.from_settings(HistorySettings(redis_url=f"redis://127.0.0.1:{port}/0",
                                                           redis_timeout_s=0.2))
        try:
            start = time.perf_counter()
            with pytest.raises(RedisTimeoutError):
                await store.read("u1")
            assert time.perf_counter() - start < 0.6
        finally:
            await store.aclose()


async def test_ping_answers_on_a_live_redis(prefix) -> None:
    store = make_store(prefix)
    try:
        assert await store.ping() is True
    finally:
        await store.aclose()


async def test_keys_carry_the_user_hash_tag(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.append("42", events((1, 4.0, 1)))
        await store.set_profile("42", {"age": "25-34"})
    finally:
        await store.aclose()
    keys = {k.decode() for k in sync_client().scan_iter(match=f"{prefix}*")}
    assert keys == {f"{prefix}{{u:42}}:events", f"{prefix}{{u:42}}:profile", f"{prefix}{{u:42}}:count"}
    assert key_slot(events_key(prefix, "42").encode()) == key_slot(profile_key(prefix, "42").encode()) \
        == key_slot(count_key(prefix, "42").encode()) == key_slot(knowledge_key(prefix, "42").encode()) \
        == key_slot(b"{u:42}")


def test_settings_reject_a_prefix_that_would_steal_the_hash_tag() -> None:
    with pytest.raises(ValueError, match="braces"):
        HistorySettings(redis_prefix="{shard}:")
    with pytest.raises(ValueError):
        HistorySettings(history_max_events=0)


async def test_foreign_records_surface_as_a_redis_error(prefix) -> None:
    sync_client().rpush(events_key(prefix, "u1"), b"12:4.0:100")
    store = make_store(prefix)
    try:
        with pytest.raises(HistoryFormatError) as info:
            await store.read("u1")
        with pytest.raises(RedisError):  # the script refuses to compare against it
            await store.append("u1", events((1, 4.0, 1)))
    finally:
        await store.aclose()
    assert isinstance(info.value, RedisError)  # the gateway degrades on RedisError


def read_all(prefix: str, user: str) -> tuple[list[int], dict[bytes, bytes]]:
    client = sync_client()
    items, _, _ = decode_records(client.lrange(events_key(prefix, user), 0, -1))
    return items.tolist(), client.hgetall(profile_key(prefix, user))


def test_bulk_load_replaces_users_idempotently(prefix) -> None:
    rows = [
        ("a", np.arange(8), np.full(8, 4.0), np.arange(8) * 10, {"age": "18-24"}),
        ("b", np.array([5]), np.array([1.0]), np.array([3]), {}),
        ("c", np.zeros(0), np.zeros(0), np.zeros(0), {"age": "56+"}),
    ]
    first = bulk_load(REDIS_URL, rows, prefix=prefix, max_events=5, batch_users=2, progress=False)
    assert first == {"users": 3, "events": 6, "truncated": 3, "profiles": 2}
    state = {u: read_all(prefix, u) for u in "abc"}
    assert state["a"] == ([3, 4, 5, 6, 7], {b"age": b"18-24"})
    assert state["b"] == ([5], {})
    assert state["c"] == ([], {b"age": b"56+"})
    assert bulk_load(REDIS_URL, rows, prefix=prefix, max_events=5, progress=False) == first
    assert {u: read_all(prefix, u) for u in "abc"} == state
    # A later load replaces (not extends) histories and profiles; no staging keys stay behind.
    bulk_load(REDIS_URL, [("a", np.array([9]), np.array([2.0]), np.array([1]), {})], prefix=prefix,
              progress=False)
    assert read_all(prefix, "a") == ([9], {})
    assert not any(k.endswith(b":loading") for k in sync_client().scan_iter(match=f"{prefix}*"))


def test_bulk_load_rejects_unordered_history(prefix) -> None:
    with pytest.raises(HistoryOrderError, match="'a'"):
        bulk_load(REDIS_URL, [("a", np.arange(3), np.ones(3), np.array([3, 1, 2]), {})], prefix=prefix,
                  progress=False)


def test_bulk_load_fails_fast_when_redis_is_unreachable() -> None:
    start = time.perf_counter()
    with pytest.raises(RedisConnectionError):
        bulk_load("redis://127.0.0.1:1/0", iter(()), progress=False)
    assert time.perf_counter() - start < 2.0


def test_store_refuses_a_client_that_decodes_replies() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        HistoryStore(aioredis.Redis.from_url(REDIS_URL, decode_responses=True))


# --- read_page: the history route's paged read, newest first


async def read_pages(store: HistoryStore, user: str, limit: int) -> list[list[int]]:
    """Every page of ``user``'s items, following ``next_offset`` against the first page's length."""
    page = await store.read_page(user, limit)
    pages = [page.items.tolist()]
    while page.next_offset is not None:
        page = await store.read_page(user, limit, page.next_offset, page.length)
        pages.append(page.items.tolist())
    return pages


async def test_pages_run_newest_first_and_end_on_the_oldest(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.append("u1", [Event(i, 1.0 + i / 2, 100 + i) for i in range(7)])
        await store.set_profile("u1", {"age": "25-34"})
        first = await store.read_page("u1", 3)
        pages = await read_pages(store, "u1", 3)
        exact = await read_pages(store, "u1", 7)
    finally:
        await store.aclose()
    assert pages == [[6, 5, 4], [3, 2, 1], [0]]
    assert exact == [[6, 5, 4, 3, 2, 1, 0]]  # a page ending on the oldest event is the last
    assert first.timestamps.tolist() == [106, 105, 104]
    np.testing.assert_array_equal(first.ratings, np.array([4.0, 3.5, 3.0], np.float32))
    assert (first.items.dtype, first.ratings.dtype, first.timestamps.dtype) == (np.int64, np.float32, np.int64)
    assert first.profile == {"age": "25-34"} and first.exists and first.length == 7 and first.next_offset == 3


async def test_appends_between_pages_do_not_shift_them(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.append("u1", [Event(i, 3.0, 100 + i) for i in range(6)])
        first = await store.read_page("u1", 2)
        await store.append("u1", [Event(50 + i, 3.0, 200 + i) for i in range(3)])  # newer events meanwhile
        second = await store.read_page("u1", 2, first.next_offset, first.length)
        third = await store.read_page("u1", 2, second.next_offset, second.length)
        fresh = await store.read_page("u1", 2)
    finally:
        await store.aclose()
    assert first.items.tolist() == [5, 4] and second.items.tolist() == [3, 2] and third.items.tolist() == [1, 0]
    assert third.next_offset is None
    assert fresh.items.tolist() == [52, 51] and fresh.length == 9  # the new events lead a new first page


async def test_at_the_cap_appends_between_pages_repeat_what_they_pushed_out(prefix) -> None:
    """The documented limit of the paging: each append at the cap drops the oldest event and moves
    every position by one, so the next page repeats one already seen event per dropped one."""
    store = make_store(prefix, max_events=5)
    try:
        await store.append("u1", [Event(i, 3.0, i) for i in range(5)])
        first = await store.read_page("u1", 2)
        await store.append("u1", [Event(5, 3.0, 5), Event(6, 3.0, 6)])  # drops events 0 and 1
        pages = [first.items.tolist()]
        page = first
        while page.next_offset is not None:
            page = await store.read_page("u1", 2, page.next_offset, page.length)
            pages.append(page.items.tolist())
    finally:
        await store.aclose()
    assert pages == [[4, 3], [4, 3], [2]]


async def test_unknown_and_profile_only_users_page_as_empty(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.set_profile("p", {"gender": "F"})
        nobody = await store.read_page("nobody", 10)
        profile_only = await store.read_page("p", 10)
    finally:
        await store.aclose()
    assert not nobody.exists and nobody.profile == {} and nobody.items.shape == (0,) and nobody.next_offset is None
    assert profile_only.exists and profile_only.profile == {"gender": "F"} and profile_only.items.shape == (0,)


async def test_pages_past_the_end_or_of_a_shrunk_list_are_empty(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.append("u1", [Event(i, 3.0, i) for i in range(4)])
        past = await store.read_page("u1", 5, offset=10, length=4)
        forged = await store.read_page("u1", 5, offset=0, length=10**18)
        first = await store.read_page("u1", 2)
        await store.delete("u1")
        gone = await store.read_page("u1", 2, first.next_offset, first.length)
    finally:
        await store.aclose()
    assert past.items.tolist() == [] and past.next_offset is None
    assert forged.items.tolist() == [] and forged.next_offset is None
    assert gone.items.tolist() == [] and gone.next_offset is None and not gone.exists


async def test_a_page_is_one_round_trip_in_one_transaction(prefix) -> None:
    pool = aioredis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
    store = HistoryStore(aioredis.Redis(connection_pool=pool), HistorySettings(redis_prefix=prefix))
    try:
        await store.append("u1", events((1, 4.0, 1), (2, 5.0, 2), (3, 1.0, 3)))
        await store.set_profile("u1", {"age": "25-34"})
        CountingConnection.writes.clear()
        first = await store.read_page("u1", 2)
        second = await store.read_page("u1", 2, first.next_offset, first.length)
        writes = list(CountingConnection.writes)
    finally:
        await store.aclose()
    assert len(writes) == 2  # one per page
    for write in writes:  # LLEN, LRANGE and HGETALL see the same moment: MULTI/EXEC
        assert all(command in write for command in (b"MULTI", b"LLEN", b"LRANGE", b"HGETALL", b"EXEC"))
    assert first.items.tolist() == [3, 2] and second.items.tolist() == [1]


async def test_page_arguments_are_checked(prefix) -> None:
    store = make_store(prefix)
    try:
        for limit, offset, length in ((0, 0, None), (1, -1, None), (1, 0, -1)):
            with pytest.raises(ValueError):
                await store.read_page("u1", limit, offset, length)
    finally:
        await store.aclose()


async def test_unreachable_redis_fails_a_page_fast() -> None:
    store = HistoryStore.from_settings(HistorySettings(redis_url="redis://127.0.0.1:1/0"))
    try:
        start = time.perf_counter()
        with pytest.raises(RedisConnectionError):
            await store.read_page("u1", 10)
        assert time.perf_counter() - start < 2.0
    finally:
        await store.aclose()
