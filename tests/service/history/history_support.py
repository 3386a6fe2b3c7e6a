"""Stores and clients on the real Redis, shared by the history tests."""

from __future__ import annotations

import redis
from tests.redis_support import REDIS_URL

from service.history import HistorySettings, HistoryStore


def sync_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def make_store(prefix: str, max_events: int = 1000) -> HistoryStore:
    # Generous socket timeouts: these tests are about the data, and a loaded CI host must not turn
    # 50 concurrent connects into a timeout (the timeouts have tests of their own).
    return HistoryStore.from_settings(HistorySettings(redis_url=REDIS_URL, redis_prefix=prefix,
                                                      history_max_events=max_events, redis_timeout_s=10.0))
