"""LLMScoreCache on the real Redis: per user and version, by fingerprint, with a time to live."""

from __future__ import annotations

import pytest

from service.config import ScoreCacheSettings
from service.nearline.score_cache import LLMScoreCache

pytestmark = [pytest.mark.anyio, pytest.mark.both_redis]  # the single node and the cluster


@pytest.fixture
def client(redis_client):
    return redis_client


async def test_scores_round_trip_exactly_per_version(client, redis_prefix):
    cache = LLMScoreCache(client, ScoreCacheSettings(llm_score_cache_ttl_s=60), prefix=redis_prefix)
    scores = {"f1": 0.123456789012345, "f2": 1e-7}
    await cache.put("u1", "v1", scores)
    assert await cache.get("u1", "v1", ["f1", "f2", "f3"]) == [scores["f1"], scores["f2"], None]
    assert await cache.get("u1", "v2", ["f1"]) == [None]  # another version never reads these
    assert await cache.get("u2", "v1", ["f1"]) == [None]  # nor another user


async def test_keys_sit_on_the_users_slot_and_expire(client, redis_prefix):
    cache = LLMScoreCache(client, ScoreCacheSettings(llm_score_cache_ttl_s=30), prefix=redis_prefix)
    await cache.put("u1", "v1", {"f": 0.5})
    key = cache.key("u1", "v1")
    assert key == f"{redis_prefix}{{u:u1}}:llm:v1"
    assert 0 < await client.ttl(key) <= 30


def test_ttl_must_be_positive():
    with pytest.raises(ValueError):
        LLMScoreCache(None, ScoreCacheSettings(llm_score_cache_ttl_s=0))
