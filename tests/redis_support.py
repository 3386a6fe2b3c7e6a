"""A scratch key prefix on the real Redis the tests run against; its keys go away afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from redis.exceptions import RedisError

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def scratch_prefix(tag: str = "test") -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} ({exc}); start one with scripts/ensure-redis")
    prefix = f"{tag}:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
