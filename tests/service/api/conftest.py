"""Fixtures for the HTTP layer: settings on a per-test Redis key prefix (``redis_prefix``, shared)
of the test's store (``redis_target``: the single node, and the cluster too in ``both_redis``
modules), the app with its lifespan running, and an in-process HTTP client (``httpx.ASGITransport``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from tests.redis_support import RedisTarget
from tests.service.api.api_support import FormulaScorer, serving
from fastapi import FastAPI

from service.api import build_app
from service.config import Settings


@pytest.fixture
def settings(redis_target: RedisTarget, redis_prefix: str) -> Settings:
    return Settings(**redis_target.values(), redis_prefix=redis_prefix, log_json=True)


@pytest.fixture
def scorer() -> FormulaScorer:
    return FormulaScorer()


@pytest.fixture
async def app(settings: Settings, scorer: FormulaScorer) -> AsyncIterator[FastAPI]:
    app = build_app(settings, scorer=scorer)
    yield app


@pytest.fixture
async def client(app: FastAPI, scorer: FormulaScorer) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(app) as client:
        scorer.history = app.state.history
        yield client
