"""Redis clients made from ``HistorySettings``: the one place that knows single node from cluster.

Every Redis user goes through here: the gateway's async client (the history store, and through
it profiles, knowledge vectors, the score cache, the served-score log and online evaluation)
and the synchronous one of the bulk loaders and the CLI. With ``redis_cluster`` the URL names a
seed node and redis-py's own cluster clients route by hash slot and follow MOVED/ASK.

No retries, as on a single node: an append is not idempotent (a retried script may have run
already) and a request's deadline is better spent degrading than waiting. The one gap this module
fills by hand is topology re-discovery after a connection error in a pipeline: redis-py's cluster
client marks its slot map stale when a single command fails on a connection, but a pipeline
without retries raises without doing so, so the map would keep naming a dead master after its
replica was promoted. ``pipeline`` refreshes it before re-raising. And where no node answers or
a slot has no master, redis-py raises ``RedisClusterException``, which is no ``RedisError``, and
a cluster that refuses a command without running it (CLUSTERDOWN, TRYAGAIN, a redirection left
over) answers with a ``ResponseError``; callers treat a Redis they cannot reach as a
``ConnectionError`` ("nothing was written": degrade, 503 with Retry-After), so the clients made
here raise ``ClusterUnavailable`` (a ``ConnectionError``) for all of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service.config import HistorySettings

AsyncRedis = aioredis.Redis | AsyncRedisCluster
SyncRedis = redis.Redis | RedisCluster

# Errors after which a cluster's slot map may be stale (a master died, a replica took over).
TOPOLOGY_ERRORS = (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException, OSError)
# A cluster's refusals: the command did not run (AskError covers MOVED too).
REFUSALS = (RedisClusterException, ClusterDownError, TryAgainError, AskError)


class ClusterUnavailable(RedisConnectionError):
    """No node of the cluster answered, or the key's slot has no reachable master."""


class GatewayCluster(AsyncRedisCluster):
    """redis-py's async cluster client, raising ``ClusterUnavailable`` for its non-Redis errors."""

    async def initialize(self, *args, **kwargs) -> GatewayCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except REFUSALS as exc:
            raise ClusterUnavailable(str(exc)) from exc

    async def execute_command(self, *args, **kwargs):
        try:
            return await super().execute_command(*args, **kwargs)
        except REFUSALS as exc:
            raise ClusterUnavailable(str(exc)) from exc


def async_client(settings: HistorySettings, *, decode_responses: bool = False) -> AsyncRedis:
    """The gateway's client: socket timeouts of ``redis_timeout_s``, no retries, a pool capped by
    ``redis_max_connections`` (per node on a cluster)."""
    extra = {} if settings.redis_max_connections is None else {"max_connections": settings.redis_max_connections}
    common = dict(socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s,
                  retry=AsyncRetry(NoBackoff(), 0), decode_responses=decode_responses, **extra)
    if settings.redis_cluster:
        # require_full_coverage=False: the slots of a live master stay served while another
        # master's slots are uncovered.
        return GatewayCluster.from_url(settings.redis_url, require_full_coverage=False, **common)
    return aioredis.Redis.from_url(settings.redis_url, **common)


def sync_client(settings: HistorySettings, *, timeout_s: float = 60.0, decode_responses: bool = False) -> SyncRedis:
    """A client for operators' tools (bulk loads, the CLI): a long read timeout, no retries."""
    common = {"socket_connect_timeout": min(timeout_s, 5.0), "socket_timeout": timeout_s,
              "retry": Retry(NoBackoff(), 0), "decode_responses": decode_responses}
    if settings.redis_cluster:
        try:  # discovers the cluster here, at once
            return RedisCluster.from_url(settings.redis_url, **common)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc
    return redis.Redis.from_url(settings.redis_url, **common)


def is_cluster(client: AsyncRedis | SyncRedis) -> bool:
    return isinstance(client, (AsyncRedisCluster, RedisCluster))


@asynccontextmanager
async def pipeline(client: AsyncRedis, *, transaction: bool = False) -> AsyncIterator:
    """``client.pipeline(transaction=...)``; on a cluster, a connection error refreshes the slot
    map before it propagates, so the next call finds a promoted replica."""
    try:
        async with client.pipeline(transaction=transaction) as pipe:
            yield pipe
    except (*TOPOLOGY_ERRORS, *REFUSALS) as exc:
        if not is_cluster(client):
            raise
        await rediscover(client)
        if isinstance(exc, REFUSALS):
            raise ClusterUnavailable(str(exc)) from exc
        raise


async def rediscover(client: AsyncRedisCluster) -> None:
    """Re-read the cluster's slot map (CLUSTER SLOTS from the first node that answers); a failure
    leaves the old map, to be refreshed by the next error."""
    try:
        await client.nodes_manager.initialize()
    except (RedisError, RedisClusterException, OSError):
        pass


async def ping(client: AsyncRedis) -> bool:
    """A single node answers PING; a cluster is up when a node reports ``cluster_state:ok`` (one
    master down and not yet replaced turns it to fail on the default full-coverage setting)."""
    if not is_cluster(client):
        return bool(await client.ping())
    info = await client.cluster_info()
    return info.get("cluster_state") in ("ok", b"ok")
