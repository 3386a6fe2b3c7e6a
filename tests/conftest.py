"""Shared test setup. Tests are packages (so files may share basenames) and import helpers such as
``redis_support``, ``tiny_llama`` and ``world_support``; the fixtures here serve every suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.redis_support import scratch_prefix
from tests.world_support import World, build_world


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the real Redis; its keys are deleted afterwards."""
    with scratch_prefix() as prefix:
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
