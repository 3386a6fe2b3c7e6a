"""The history store on a Redis Cluster of the session's own: every read, append and page of a
user stays on the user's slot, whichever master holds it; bulk loads land on the right masters;
durable appends are on the master's and a replica's append-only file when acknowledged."""

from __future__ import annotations

import time

import numpy as np
import pytest
from redis.exceptions import RedisError

from service.history import (
    Event,
    HistoryStore,
    KnowledgeRecord,
    bulk_load,
    bulk_load_knowledge,
    events_key,
)
from tests.http_support import closed_port
from tests.redis_support import OwnCluster, RedisTarget, scratch_prefix

pytestmark = pytest.mark.anyio
USERS = [f"user{i}" for i in range(24)]


@pytest.fixture
def prefix(redis_cluster: OwnCluster):
    with scratch_prefix(target=redis_cluster.target) as p:
        yield p


def store_on(cluster: OwnCluster, prefix: str, **settings) -> HistoryStore:
    return HistoryStore.from_settings(cluster.target.history(redis_prefix=prefix, redis_timeout_s=5.0, **settings))


async def test_every_users_state_round_trips_on_whichever_master_holds_it(redis_cluster, prefix):
    assert len({redis_cluster.master_of(events_key(prefix, u)) for u in USERS}) == 3  # all masters take part
    store = store_on(redis_cluster, prefix)
    try:
        assert await store.ping()
        for n, user in enumerate(USERS):
            await store.append(user, [Event(n + 1, 4.0, 100), Event(n + 2, 2.0, 101)])
            await store.set_profile(user, {"age": str(n)})
            knowledge = KnowledgeRecord(np.full(4, n, np.float32), "enc", 2, 1.0)
            assert await store.put_knowledge(user, knowledge)
        for n, user in enumerate(USERS):
            history, count = await store.read_with_count(user)
            assert history.items.tolist() == [n + 1, n + 2] and count == 2 and history.profile == {"age": str(n)}
            assert history.knowledge is not None and history.knowledge.vector.tolist() == [n] * 4
            page = await store.read_page(user, limit=1)
            assert page.items.tolist() == [n + 2] and page.next_offset == 1
            assert (await store.append_counted(user, [])).count == 2
        await store.delete(USERS[0])
        assert not (await store.read(USERS[0])).exists
    finally:
        await store.aclose()


async def test_bulk_loads_reach_every_master(redis_cluster, prefix):
    rows = [(u, np.arange(1, 4) + n, np.ones(3), np.array([1, 2, 3]), {"g": "F"}) for n, u in enumerate(USERS)]
    counts = bulk_load(redis_cluster.target.history(), rows, prefix=prefix, batch_users=5, progress=False)
    assert counts == {"users": len(USERS), "events": 3 * len(USERS), "truncated": 0, "profiles": len(USERS)}
    vectors = [(u, KnowledgeRecord(np.ones(2, np.float32), "enc", 3, 1.0)) for u in USERS]
    assert bulk_load_knowledge(redis_cluster.target.history(), vectors, prefix=prefix, progress=False) == {
        "vectors": len(USERS), "without": 0}
    store = store_on(redis_cluster, prefix)
    try:
        for n, user in enumerate(USERS):
            history = await store.read(user)
            assert history.items.tolist() == [n + 1, n + 2, n + 3] and history.knowledge is not None
    finally:
        await store.aclose()


async def test_a_durable_append_is_on_a_replica_when_acknowledged(durable_cluster):
    with scratch_prefix(target=durable_cluster.target) as prefix:
        store = store_on(durable_cluster, prefix, events_durable=True)
        try:
            await store.check_durable()
            started = time.perf_counter()
            for n, user in enumerate(USERS[:6]):
                assert await store.append(user, [Event(n + 1, 5.0, 100)]) == 1
            assert time.perf_counter() - started < 3.0  # the replicas answer at once, not once a second
            for n, user in enumerate(USERS[:6]):
                _, replica = durable_cluster.nodes_of(events_key(prefix, user))
                with durable_cluster.node(replica) as client:
                    client.execute_command("READONLY")
                    assert client.llen(events_key(prefix, user)) == 1
        finally:
            await store.aclose()


async def test_a_cluster_without_an_append_only_file_is_refused_for_durable_appends(redis_cluster, prefix):
    store = store_on(redis_cluster, prefix, events_durable=True)
    try:
        with pytest.raises(RuntimeError, match="events_durable needs"):
            await store.check_durable()
    finally:
        await store.aclose()


async def test_an_unreachable_cluster_fails_fast_as_a_redis_error():
    store = HistoryStore.from_settings(RedisTarget(f"redis://127.0.0.1:{closed_port()}/0", cluster=True).history())
    try:
        started = time.perf_counter()
        with pytest.raises(RedisError):
            await store.read("u1")
        with pytest.raises(RedisError):
            await store.append("u1", [Event(1, 1.0, 1)])
        assert not await store.ping()
        assert time.perf_counter() - started < 2.0
    finally:
        await store.aclose()
