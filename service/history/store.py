"""Each user's lifelong behaviour history and profile in Redis.

Key layout (the ``{u:<user_id>}`` hash tag keeps a user's keys on one Redis Cluster slot, so the
read pipeline and the append script never cross slots):

- ``<prefix>{u:<user_id>}:events``  LIST of behaviour records, oldest first, capped to the most
  recent ``max_events`` (RPUSH + LTRIM in one script, so the cap holds under concurrent appends);
- ``<prefix>{u:<user_id>}:profile`` HASH of profile fields (str -> str).

User ids are the raw (external) ids as strings and items are raw item ids, because product
services know those; mapping to the model's dense ids is the model's job and changes per bundle.

Record encoding: one fixed-width 20-byte little-endian struct per behaviour, ``RECORD`` =
(item int64, timestamp int64 seconds, rating float32). A read joins the LRANGE reply and decodes
every record with a single ``np.frombuffer``: no per-record Python parsing on the request path.
The append script reads the timestamp of the last record at byte offset 8 to enforce time order.

Reply parsing, not decoding, is the cost of a long history: LRANGE answers one bulk string per
record, which redis-py's pure-Python parser handles at ~4 us each (~4 ms for 1000 records) and
the hiredis parser at ~0.3 ms in all; deploy with hiredis (``scripts/bench_history.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

RECORD = np.dtype([("item", "<i8"), ("timestamp", "<i8"), ("rating", "<f4")])  # packed, 20 bytes
RECORD_SIZE = RECORD.itemsize

# KEYS[1] events list. ARGV[1] cap, ARGV[2] the oldest new timestamp, ARGV[3..] records.
# Returns {1, stored length} or, when the new events are older than the latest stored one,
# {0, latest timestamp} having written nothing. RPUSH in slices: Lua's unpack() has a stack limit.
_APPEND_LUA = """
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
  if #last ~= 20 then return redis.error_reply('history record of ' .. #last .. ' bytes, expected 20') end
  local latest = struct.unpack('<i8', last, 9)
  if tonumber(ARGV[2]) < latest then return {0, latest} end
end
local n = 0
for i = 3, #ARGV, 1000 do
  n = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local cap = tonumber(ARGV[1])
if n > cap then redis.call('LTRIM', KEYS[1], -cap, -1); n = cap end
return {1, n}
"""


class HistoryOrderError(ValueError):
    """Events out of time order: appending them would break the oldest-first history."""


class HistoryFormatError(RedisError):
    """Stored records are not in this format. A RedisError, so callers degrade as for an outage."""


@dataclass(frozen=True, slots=True)
class Event:
    item: int
    rating: float
    timestamp: int  # seconds


@dataclass(frozen=True)
class UserHistory:
    """One user's stored state, oldest behaviour first; empty arrays for an unknown user."""

    items: np.ndarray  # int64 raw item ids
    ratings: np.ndarray  # float32
    timestamps: np.ndarray  # int64 seconds
    profile: dict[str, str] = field(default_factory=dict)
    exists: bool = False


@dataclass(frozen=True)
class HistorySettings:
    """Short socket timeouts by default: the gateway reads inside a per-request deadline and
    treats a slow or dead Redis as "unreachable" (cold start) rather than waiting on it."""

    prefix: str = ""
    max_events: int = 1000
    socket_timeout: float = 0.5
    socket_connect_timeout: float = 0.5
    max_connections: int | None = None

    def __post_init__(self) -> None:
        check_layout(self.prefix, self.max_events)
        if self.socket_timeout <= 0 or self.socket_connect_timeout <= 0:
            raise ValueError("socket timeouts must be positive seconds")


def check_layout(prefix: str, max_events: int) -> None:
    # A brace in the prefix would become the cluster hash tag instead of {u:<id>}.
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"key prefix must not contain braces, got {prefix!r}")
    if max_events < 1:
        raise ValueError(f"max_events must be at least 1, got {max_events}")


def _tag(prefix: str, user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
    return f"{prefix}{{u:{user_id}}}"


def events_key(prefix: str, user_id: str) -> str:
    return f"{_tag(prefix, user_id)}:events"


def profile_key(prefix: str, user_id: str) -> str:
    return f"{_tag(prefix, user_id)}:profile"


def encode_records(items: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray) -> list[bytes]:
    """Pack parallel arrays into one 20-byte record per behaviour."""
    n = len(items)
    if not len(ratings) == len(timestamps) == n:
        raise ValueError(f"items, ratings and timestamps differ in length: {n}, {len(ratings)}, {len(timestamps)}")
    packed = np.empty(n, dtype=RECORD)
    packed["item"], packed["timestamp"], packed["rating"] = items, timestamps, ratings
    buf = packed.tobytes()
    return [buf[i:i + RECORD_SIZE] for i in range(0, len(buf), RECORD_SIZE)]


def decode_records(records: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records -> (items int64, ratings float32, timestamps int64), writable contiguous arrays."""
    buf = b"".join(records)
    if len(buf) != len(records) * RECORD_SIZE:
        raise HistoryFormatError(f"{len(records)} history records take {len(buf)} bytes, "
                                 f"expected {RECORD_SIZE} each")
    packed = np.frombuffer(buf, dtype=RECORD)
    return packed["item"].copy(), packed["rating"].copy(), packed["timestamp"].copy()


def _check_order(timestamps: np.ndarray, user_id: str) -> None:
    if len(timestamps) > 1 and bool((np.diff(timestamps) < 0).any()):
        raise HistoryOrderError(f"events of user {user_id!r} are not in non-decreasing timestamp order")


class HistoryStore:
    """Async access to the history store for the gateway: one round trip per read."""

    def __init__(self, client: aioredis.Redis, settings: HistorySettings = HistorySettings()) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the history store needs a client with decode_responses=False (records are binary)")
        self._redis = client
        self.settings = settings
        self._append = client.register_script(_APPEND_LUA)

    @classmethod
    def from_url(cls, url: str, settings: HistorySettings = HistorySettings()) -> "HistoryStore":
        # No retries: appends are not idempotent (a retried script may have run already) and a
        # request deadline is better spent degrading than retrying. Stale pooled connections are
        # still replaced when they are checked out.
        extra = {} if settings.max_connections is None else {"max_connections": settings.max_connections}
        client = aioredis.Redis.from_url(url, socket_timeout=settings.socket_timeout,
                                         socket_connect_timeout=settings.socket_connect_timeout,
                                         retry=AsyncRetry(NoBackoff(), 0), decode_responses=False, **extra)
        return cls(client, settings)

    def _keys(self, user_id: str) -> tuple[str, str]:
        return events_key(self.settings.prefix, user_id), profile_key(self.settings.prefix, user_id)

    async def read(self, user_id: str) -> UserHistory:
        """The user's most recent ``max_events`` behaviours and profile (LRANGE + HGETALL pipelined)."""
        ev_key, prof_key = self._keys(user_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lrange(ev_key, -self.settings.max_events, -1)
            pipe.hgetall(prof_key)
            records, raw_profile = await pipe.execute()
        items, ratings, timestamps = decode_records(records)
        profile = {k.decode(): v.decode() for k, v in raw_profile.items()}
        return UserHistory(items, ratings, timestamps, profile, exists=bool(records or profile))

    async def append(self, user_id: str, events: Sequence[Event]) -> int:
        """Append events atomically and return the number stored afterwards (after the cap).

        ``events`` must be in non-decreasing timestamp order and no older than the user's latest
        stored event; otherwise ``HistoryOrderError`` is raised and nothing is written. The check
        runs inside the script, so it holds against concurrent appends too.
        """
        ev_key, _ = self._keys(user_id)
        if not events:
            return int(await self._redis.llen(ev_key))
        timestamps = np.fromiter((int(e.timestamp) for e in events), dtype=np.int64, count=len(events))
        _check_order(timestamps, user_id)
        items = np.fromiter((int(e.item) for e in events), dtype=np.int64, count=len(events))
        ratings = np.fromiter((float(e.rating) for e in events), dtype=np.float32, count=len(events))
        if not np.isfinite(ratings).all():
            raise ValueError(f"events of user {user_id!r} carry a non-finite rating")
        cap = self.settings.max_events
        records = encode_records(items[-cap:], ratings[-cap:], timestamps[-cap:])
        ok, value = await self._append(keys=[ev_key], args=[cap, int(timestamps[0]), *records])
        if not ok:
            raise HistoryOrderError(f"event at {int(timestamps[0])} is older than the latest stored event "
                                    f"of user {user_id!r} at {int(value)}; nothing was written")
        return int(value)

    async def set_profile(self, user_id: str, profile: Mapping[str, str], replace: bool = True) -> None:
        """Write profile fields; ``replace`` drops fields not in ``profile`` (atomically, MULTI/EXEC)."""
        _, prof_key = self._keys(user_id)
        mapping = {str(k): str(v) for k, v in profile.items()}
        if not replace and not mapping:
            return
        async with self._redis.pipeline(transaction=replace) as pipe:
            if replace:
                pipe.delete(prof_key)
            if mapping:
                pipe.hset(prof_key, mapping=mapping)
            await pipe.execute()

    async def delete(self, user_id: str) -> None:
        """Forget a user: history and profile."""
        await self._redis.delete(*self._keys(user_id))

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()


UserRecords = tuple[str, np.ndarray, np.ndarray, np.ndarray, Mapping[str, str]]


def bulk_load(redis_url: str, histories: Iterable[UserRecords], *, prefix: str = "", max_events: int = 1000,
              batch_users: int = 500, progress: bool = True, total: int | None = None) -> dict[str, int]:
    """Replace the stored history and profile of every user in ``histories``; idempotent.

    ``histories`` yields (user_id, items, ratings, timestamps, profile), each user's behaviours
    oldest first. Many users go in one pipelined round trip. Each key is built under a staging
    name and RENAMEd into place, so a gateway reading during the load sees a user's old or new
    history, never a half-written one. Events appended to a user while the load runs are lost.
    """
    from tqdm import tqdm

    check_layout(prefix, max_events)
    if batch_users < 1:
        raise ValueError(f"batch_users must be at least 1, got {batch_users}")
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5.0, socket_timeout=60.0, retry=Retry(NoBackoff(), 0))
    counts = {"users": 0, "events": 0, "truncated": 0, "profiles": 0}
    try:
        client.ping()  # fail before reading any input when Redis is unreachable
        pipe = client.pipeline(transaction=False)
        pending = 0
        for user_id, items, ratings, timestamps, profile in tqdm(histories, total=total, unit="user",
                                                                disable=not progress):
            user_id = str(user_id)
            timestamps = np.asarray(timestamps, dtype=np.int64)
            _check_order(timestamps, user_id)
            records = encode_records(np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float32),
                                     timestamps)[-max_events:]
            mapping = {str(k): str(v) for k, v in profile.items()}
            _queue_replace(pipe, events_key(prefix, user_id), records=records)
            _queue_replace(pipe, profile_key(prefix, user_id), mapping=mapping)
            counts["users"] += 1
            counts["events"] += len(records)
            counts["truncated"] += len(timestamps) - len(records)
            counts["profiles"] += bool(mapping)
            pending += 1
            if pending >= batch_users:
                pipe.execute()
                pending = 0
        if pending:
            pipe.execute()
    finally:
        client.close()
    return counts


def _queue_replace(pipe: redis.client.Pipeline, key: str, records: Sequence[bytes] = (),
                   mapping: Mapping[str, str] | None = None) -> None:
    """Queue writing ``records`` (a list) or ``mapping`` (a hash) under a staging name and a RENAME
    over ``key``; with nothing to write, queue a DEL of ``key``."""
    if not records and not mapping:
        pipe.delete(key)
        return
    staging = f"{key}:loading"
    pipe.delete(staging)
    if records:
        pipe.rpush(staging, *records)
    else:
        pipe.hset(staging, mapping=mapping)
    pipe.rename(staging, key)


__all__ = ["RECORD", "Event", "HistoryFormatError", "HistoryOrderError", "HistorySettings", "HistoryStore",
           "UserHistory", "bulk_load", "decode_records", "encode_records", "events_key", "profile_key"]
