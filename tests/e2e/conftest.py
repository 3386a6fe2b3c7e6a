"""The end-to-end suite: the shared world (``tests/conftest.py``) served over real HTTP.

The service runs under uvicorn on a loopback port, its model built by the lifespan from
``Settings`` exactly as in production (``service.api.wiring.build_runtime``).

``reference`` recomputes the LLM's answer independently of the serving engine: a float32 copy of
the base model with ``PersonalizedLoRA`` loaded from the bundle's weights, scored with
``training.llm.scoring.score_sequences`` on full prompts (no prefix KV reuse).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from tests.e2e.e2e_support import LiveServer, Reference, World


@pytest.fixture(scope="session")
def live(world: World) -> Iterator[LiveServer]:
    """The service over real HTTP, its runtime built by the lifespan from settings."""
    server = LiveServer.start(world.settings())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client() as client:
        yield client


@pytest.fixture(scope="session")
def reference(world: World) -> Reference:
    return Reference(world)
