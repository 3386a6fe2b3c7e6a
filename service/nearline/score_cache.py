"""LLM scores in Redis, shared by every gateway replica.

One hash per user and model version, ``<prefix>{u:<user_id>}:llm:<version>`` (the user's hash tag,
so it sits on the user's Redis Cluster slot), with one field per scored prompt: a fingerprint of
everything the score depends on (the adapter's content, the user's stored history and profile,
the prompt's tokens), so a stale score can never be read as a fresh one; a new event, a profile
change or an activation simply misses. The hash expires ``llm_score_cache_ttl_s`` after its last write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from service.config import ScoreCacheSettings
from service.history.clients import AsyncRedis, pipeline
from service.history.layout import user_tag


class LLMScoreCache:
    def __init__(self, client: AsyncRedis, settings: ScoreCacheSettings | None = None, *,
                 prefix: str = "") -> None:
        self._redis, self.prefix = client, prefix
        self.settings = settings or ScoreCacheSettings()

    def key(self, user_id: str, version: str) -> str:
        return f"{user_tag(self.prefix, user_id)}:llm:{version}"

    async def get(self, user_id: str, version: str, fields: Sequence[str]) -> list[float | None]:
        """The cached score of each fingerprint, None where there is none (one HMGET)."""
        if not fields:
            return []
        values = await self._redis.hmget(self.key(user_id, version), list(fields))
        return [None if v is None else float(v) for v in values]

    async def put(self, user_id: str, version: str, scores: Mapping[str, float]) -> None:
        """Store scores by fingerprint and restart the hash's time to live (one round trip)."""
        if not scores:
            return
        key = self.key(user_id, version)
        async with pipeline(self._redis) as pipe:
            pipe.hset(key, mapping={field: repr(float(score)) for field, score in scores.items()})
            pipe.expire(key, self.settings.llm_score_cache_ttl_s)
            await pipe.execute()
