"""Fixtures for the HTTP layer: a real Redis under a per-test key prefix, the app with its
lifespan running, and an in-process HTTP client (``httpx.ASGITransport``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis
from api_support import REDIS_URL, FormulaScorer, serving
from fastapi import FastAPI
from redis.exceptions import RedisError

from service.api import build_app
from service.config import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_prefix():
    """A fresh key prefix on the real Redis; its keys are deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} ({exc}); start one with scripts/ensure-redis")
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def settings(redis_prefix: str) -> Settings:
    return Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, log_json=True)


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
