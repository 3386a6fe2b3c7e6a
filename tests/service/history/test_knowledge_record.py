"""User knowledge vector records beside the histories, against a real Redis: the record's format,
the one-round-trip read, malformed records, the event count appends keep, conditional writes,
deletion and the bulk loader."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from tests.service.history.history_support import make_store, sync_client
from tests.redis_support import REDIS_URL

from service.history import (Event, HistorySettings, HistoryStore, KnowledgeFormatError, KnowledgeRecord,
                             KnowledgeStamp, bulk_load, bulk_load_knowledge, count_key, decode_knowledge,
                             encode_knowledge, events_key, knowledge_key)

pytestmark = pytest.mark.anyio




def record(seed: int = 0, dim: int = 8, events_at: int = 3, encoder: str = "enc-a", at: float = 1.7e9):
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return KnowledgeRecord(vector, encoder, events_at, at)


def events(n: int, start: int = 0) -> list[Event]:
    return [Event(item=i + 1, rating=4.0, timestamp=100 + start + i) for i in range(n)]


def same(a: KnowledgeRecord | None, b: KnowledgeRecord) -> bool:
    return (a is not None and np.array_equal(a.vector, b.vector) and a.vector.dtype == np.float32
            and (a.encoder, a.events_at, a.generated_at) == (b.encoder, b.events_at, b.generated_at))


def test_a_record_encodes_to_its_hash_and_back() -> None:
    want = record(dim=384)
    fields = encode_knowledge(want)
    assert fields["vector"] == want.vector.astype("<f4").tobytes() and len(fields["vector"]) == 384 * 4
    assert (fields["encoder"], fields["dim"], fields["events_at"]) == ("enc-a", "384", "3")
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    assert same(decode_knowledge(raw), want)
    assert decode_knowledge({}) is None


@pytest.mark.parametrize("bad", [
    {b"encoder": b"enc-a", b"dim": b"2", b"events_at": b"1", b"generated_at": b"1.0"},  # no vector
    {b"vector": b"\0" * 12, b"encoder": b"enc-a", b"dim": b"2", b"events_at": b"1", b"generated_at": b"1.0"},
    {b"vector": b"\0" * 8, b"encoder": b"enc-a", b"dim": b"two", b"events_at": b"1", b"generated_at": b"1.0"},
    {b"vector": np.array([1.0, np.nan], "<f4").tobytes(), b"encoder": b"enc-a", b"dim": b"2", b"events_at": b"1",
     b"generated_at": b"1.0"},
    {b"vector": b"\0" * 8, b"encoder": b"", b"dim": b"2", b"events_at": b"1", b"generated_at": b"1.0"},
    {b"vector": b"\0" * 8, b"encoder": b"enc-a", b"dim": b"2", b"events_at": b"-1", b"generated_at": b"1.0"},
])
def test_malformed_fields_are_a_format_error(bad) -> None:
    with pytest.raises(KnowledgeFormatError):
        decode_knowledge(bad)


async def test_the_record_round_trips_through_the_store(prefix) -> None:
    store = make_store(prefix)
    want = record(dim=384, events_at=2)
    try:
        await store.append("u1", events(2))
        assert await store.put_knowledge("u1", want)
        history = await store.read("u1")
        plain = await store.read("u2")
    finally:
        await store.aclose()
    assert same(history.knowledge, want) and history.knowledge.dim == 384 and history.knowledge_error is None
    assert history.items.tolist() == [1, 2]
    assert plain.knowledge is None and plain.knowledge_error is None


async def test_read_fetches_the_record_in_the_same_round_trip(prefix) -> None:
    from tests.service.history.test_store import CountingConnection

    pool = aioredis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
    store = HistoryStore(aioredis.Redis(connection_pool=pool), HistorySettings(redis_prefix=prefix))
    try:
        await store.append("u1", events(2))
        await store.set_profile("u1", {"age": "25-34"})
        await store.put_knowledge("u1", record())
        CountingConnection.writes.clear()
        history = await store.read("u1")
        writes = list(CountingConnection.writes)
    finally:
        await store.aclose()
    assert len(writes) == 1
    assert writes[0].count(b"HGETALL") == 2 and b"LRANGE" in writes[0] and b":knowledge" in writes[0]
    assert history.knowledge is not None and history.profile == {"age": "25-34"}


@pytest.mark.parametrize("write", ["short_vector", "missing_field", "not_a_hash"])
async def test_a_malformed_record_reads_as_none_and_says_why(prefix, write) -> None:
    key = knowledge_key(prefix, "u1")
    client = sync_client()
    if write == "short_vector":
        client.hset(key, mapping={"vector": b"\0" * 6, "encoder": "enc-a", "dim": "2", "events_at": "1",
                                  "generated_at": "1.0"})
    elif write == "missing_field":
        client.hset(key, mapping={"vector": b"\0" * 8, "dim": "2"})
    else:
        client.set(key, b"a vector")
    store = make_store(prefix)
    try:
        await store.append("u1", events(3))
        history = await store.read("u1")
        counted, _ = await store.read_with_count("u1")
        appended = await store.append_counted("u1", events(1, start=10))
        # a refresh may replace a malformed record, whatever it holds
        assert await store.put_knowledge("u1", record(events_at=4))
        fixed = await store.read("u1")
    finally:
        await store.aclose()
    assert history.knowledge is None and history.knowledge_error
    assert history.items.tolist() == [1, 2, 3]  # the history itself is served
    assert counted.knowledge is None and counted.knowledge_error
    assert appended.stored == 4 and appended.knowledge is None
    assert same(fixed.knowledge, record(events_at=4))


async def test_appends_count_events_past_the_cap_and_leave_the_record_alone(prefix) -> None:
    store = make_store(prefix, max_events=5)
    want = record(events_at=3)
    try:
        first = await store.append_counted("u1", events(3))
        assert first.stored == 3 and first.count == 3 and first.knowledge is None
        assert await store.put_knowledge("u1", want)
        raw_before = sync_client().hgetall(knowledge_key(prefix, "u1"))
        second = await store.append_counted("u1", events(4, start=10))
        third = await store.append_counted("u1", events(20, start=100))  # more than the cap at once
        empty = await store.append_counted("u1", [])
        history, count = await store.read_with_count("u1")
    finally:
        await store.aclose()
    assert (second.stored, second.count) == (5, 7)
    assert second.knowledge == KnowledgeStamp(events_at=3, encoder="enc-a", dim=8)
    assert (third.stored, third.count) == (5, 27) and (empty.stored, empty.count) == (5, 27)
    assert empty.knowledge == second.knowledge
    assert sync_client().hgetall(knowledge_key(prefix, "u1")) == raw_before
    assert count == 27 and len(history.items) == 5 and same(history.knowledge, want)


async def test_a_user_stored_without_a_count_starts_from_their_list(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.append("u1", events(4))
        sync_client().delete(count_key(prefix, "u1"))  # as stored before event counts were kept
        _, before = await store.read_with_count("u1")
        after = await store.append_counted("u1", events(2, start=10))
    finally:
        await store.aclose()
    assert before == 4 and after.count == 6


async def test_a_write_never_replaces_a_record_from_more_events_nor_revives_a_user(prefix) -> None:
    store = make_store(prefix)
    try:
        assert not await store.put_knowledge("gone", record())  # no events: nothing written
        await store.append("u1", events(12))
        assert await store.put_knowledge("u1", record(seed=1, events_at=10))
        assert not await store.put_knowledge("u1", record(seed=2, events_at=9))
        assert await store.put_knowledge("u1", record(seed=3, events_at=10))
        kept = (await store.read("u1")).knowledge
    finally:
        await store.aclose()
    assert same(kept, record(seed=3, events_at=10))
    assert not sync_client().exists(knowledge_key(prefix, "gone"))


async def test_deleting_a_user_deletes_the_record_and_count(prefix) -> None:
    store = make_store(prefix)
    try:
        await store.append("u1", events(2))
        await store.set_profile("u1", {"age": "25-34"})
        await store.put_knowledge("u1", record(events_at=2))
        await store.delete("u1")
        history, count = await store.read_with_count("u1")
    finally:
        await store.aclose()
    assert not history.exists and history.knowledge is None and count == 0
    assert not list(sync_client().scan_iter(match=f"{prefix}*"))


def test_bulk_loads_set_event_counts_and_replace_records_idempotently(prefix) -> None:
    rows = [("a", np.arange(8), np.full(8, 4.0), np.arange(8) * 10, {}), ("b", np.zeros(0), np.zeros(0),
                                                                            np.zeros(0), {"age": "56+"})]
    bulk_load(REDIS_URL, rows, prefix=prefix, max_events=5, progress=False)
    client = sync_client()
    assert client.get(count_key(prefix, "a")) == b"8" and not client.exists(count_key(prefix, "b"))

    vectors = [("a", record(seed=1, events_at=6)), ("b", None), ("c", record(seed=2, events_at=0))]
    client.hset(knowledge_key(prefix, "b"), mapping={"vector": b"old"})  # a stale record of a user now without one
    first = bulk_load_knowledge(REDIS_URL, vectors, prefix=prefix, batch_users=2, progress=False)
    state = {u: client.hgetall(knowledge_key(prefix, u)) for u in "abc"}
    assert bulk_load_knowledge(REDIS_URL, vectors, prefix=prefix, progress=False) == first == {"vectors": 2,
                                                                                               "without": 1}
    assert {u: client.hgetall(knowledge_key(prefix, u)) for u in "abc"} == state
    assert same(decode_knowledge(state["a"]), record(seed=1, events_at=6)) and state["b"] == {}
    assert not any(k.endswith(b":loading") for k in client.scan_iter(match=f"{prefix}*"))
    # a history reload leaves the records alone
    bulk_load(REDIS_URL, rows, prefix=prefix, max_events=5, progress=False)
    assert client.hgetall(knowledge_key(prefix, "a")) == state["a"]
    assert events_key(prefix, "a").encode() in set(client.scan_iter(match=f"{prefix}*"))
