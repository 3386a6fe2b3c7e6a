"""Fixtures of the client tests: settings on a fresh Redis key prefix, the live gateway."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.client.client_support import REDIS_URL, FormulaScorer, Gateway, running_gateway

from service.api import build_app
from service.config import Settings


@pytest.fixture
def settings(redis_prefix: str) -> Settings:
    return Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, log_json=True)


@pytest.fixture
def gateway(settings: Settings) -> Iterator[Gateway]:
    """The real gateway app over HTTP, scoring with ``FormulaScorer`` on the real Redis."""
    scorer = FormulaScorer()
    with running_gateway(settings, build_app(settings, scorer=scorer), scorer) as live:
        yield live
