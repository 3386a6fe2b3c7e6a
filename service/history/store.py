"""The gateway's async access to user histories in Redis (layout in ``service.history.layout``).

Appends are one Lua script (order check + RPUSH + LTRIM + the event count), so the cap holds and
concurrent appends never interleave; the script reads the timestamp of the last record at byte
offset 8 to enforce time order, and answers the stamp of the user's knowledge record, so deciding
whether it is due for a refresh costs no round trip of its own. A read is one pipelined round
trip (LRANGE + HGETALL of the profile + HGETALL of the knowledge record).

On a Redis Cluster (``redis_cluster``; the client comes from ``service.history.clients``) every
read, append, page and script here touches one user's keys, which share the ``{u:<id>}`` hash
tag: each pipeline, transaction and script runs on the master of that user's slot.

Reply parsing, not decoding, is the cost of a long history: LRANGE answers one bulk string per
record, which redis-py's pure-Python parser handles at ~4 us each (~4 ms for 1000 records) and
the hiredis parser at ~0.3 ms in all; deploy with hiredis (``scripts/bench_history.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from redis.exceptions import AskError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import HistorySettings
from service.history.clients import AsyncRedis, ClusterUnavailable, async_client, is_cluster, pipeline, rediscover
from service.history.clients import ping as ping_client
from service.history.layout import (AppendResult, Event, HistoryOrderError, KnowledgeFormatError,
                                    KnowledgeRecord, UserHistory, check_order, count_key,
                                    decode_knowledge, decode_records, decode_stamp, encode_knowledge, encode_records,
                                    events_key, knowledge_key, profile_key, user_keys)

# KEYS[1] events list, KEYS[2] event count, KEYS[3] knowledge record (read only).
# ARGV[1] cap, ARGV[2] the oldest new timestamp, ARGV[3] events appended, ARGV[4..] their records
# (the most recent ``cap`` of them).
# Returns {1, stored length, event count, {events_at, encoder, dim, vector bytes} of the knowledge
# record} or,
# when the new events are older than the latest stored one, {0, latest timestamp} having written
# nothing. RPUSH in slices: Lua's unpack() has a stack limit. A user stored without an event
# count starts from the length of their list.
_APPEND_LUA = """
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
  if #last ~= 20 then return redis.error_reply('history record of ' .. #last .. ' bytes, expected 20') end
  local latest = struct.unpack('<i8', last, 9)
  if tonumber(ARGV[2]) < latest then return {0, latest} end
end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], redis.call('LLEN', KEYS[1])) end
local count = redis.call('INCRBY', KEYS[2], ARGV[3])
local n = 0
for i = 4, #ARGV, 1000 do
  n = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local cap = tonumber(ARGV[1])
if n > cap then redis.call('LTRIM', KEYS[1], -cap, -1); n = cap end
local stamp = {}
if redis.call('TYPE', KEYS[3]).ok == 'hash' then
  stamp = redis.call('HMGET', KEYS[3], 'events_at', 'encoder', 'dim')
  stamp[4] = redis.call('HSTRLEN', KEYS[3], 'vector')
end
return {1, n, count, stamp}
"""

# KEYS[1] knowledge record, KEYS[2] events list. ARGV[1] the new record's events_at, ARGV[2..] its
# fields and values. Replaces the record (or a malformed key) unless the stored one was generated
# from more events (a newer refresh or load won) or the user has no events (deleted meanwhile).
# Returns 1 if written.
_PUT_KNOWLEDGE_LUA = """
local current = nil
if redis.call('TYPE', KEYS[1]).ok == 'hash' then current = tonumber(redis.call('HGET', KEYS[1], 'events_at')) end
if current and current > tonumber(ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# How long a durable append waits for Redis to report the write on disk (WAITAOF).
DURABLE_TIMEOUT_MS = 2000


class HistoryReader(Protocol):
    """What the scoring pipeline reads: one user's stored state."""

    async def read(self, user_id: str) -> UserHistory: ...


@dataclass(frozen=True)
class HistoryPage:
    """One page of a user's events, newest first (``read_page``)."""

    items: np.ndarray  # int64 raw item ids, newest first
    ratings: np.ndarray  # float32
    timestamps: np.ndarray  # int64 seconds
    profile: dict[str, str]
    exists: bool  # any event or profile field stored now
    length: int  # the list length the page is counted against (seen by the first page)
    next_offset: int | None  # the offset of the next, older page; None on the last page


class HistoryStore:
    """Async access to the history store for the gateway: one round trip per read."""

    def __init__(self, client: AsyncRedis, settings: HistorySettings | None = None) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the history store needs a client with decode_responses=False (records are binary)")
        self._redis = client
        self.settings = settings or HistorySettings()
        self._append = client.register_script(_APPEND_LUA)
        self._put_knowledge = client.register_script(_PUT_KNOWLEDGE_LUA)

    @classmethod
    def from_settings(cls, settings: HistorySettings) -> "HistoryStore":
        """A store on its own connection pool to ``settings.redis_url`` (a single node or a
        cluster, ``service.history.clients``)."""
        return cls(async_client(settings), settings)

    @property
    def client(self) -> AsyncRedis:
        """The connection pool, for other per-user data kept beside the histories."""
        return self._redis

    def _keys(self, user_id: str) -> tuple[str, str]:
        return events_key(self.settings.redis_prefix, user_id), profile_key(self.settings.redis_prefix, user_id)

    def _queue_state(self, pipe, user_id: str) -> None:
        """Queue the reads of a user's state on ``pipe``: events, profile, knowledge record (the
        replies ``_history`` decodes, in that order)."""
        ev_key, prof_key = self._keys(user_id)
        pipe.lrange(ev_key, -self.settings.history_max_events, -1)
        pipe.hgetall(prof_key)
        pipe.hgetall(knowledge_key(self.settings.redis_prefix, user_id))

    async def read(self, user_id: str) -> UserHistory:
        """The user's most recent ``max_events`` behaviours, profile and knowledge record (LRANGE +
        HGETALL + HGETALL pipelined). A malformed knowledge record reads as none, saying why."""
        async with pipeline(self._redis, transaction=False) as pipe:
            self._queue_state(pipe, user_id)
            records, raw_profile, raw_knowledge = _raise_but_knowledge(await pipe.execute(raise_on_error=False))
        return _history(records, raw_profile, raw_knowledge)

    async def read_with_count(self, user_id: str) -> tuple[UserHistory, int]:
        """The user's state as ``read`` gives it and their event count at that same moment
        (MULTI/EXEC): what a knowledge refresh generates from, and the count it records."""
        async with pipeline(self._redis, transaction=True) as pipe:
            self._queue_state(pipe, user_id)
            pipe.get(count_key(self.settings.redis_prefix, user_id))
            records, raw_profile, raw_knowledge, count = _raise_but_knowledge(await pipe.execute(raise_on_error=False))
        history = _history(records, raw_profile, raw_knowledge)
        return history, len(records) if count is None else int(count)

    async def put_knowledge(self, user_id: str, record: KnowledgeRecord) -> bool:
        """Replace the user's knowledge record atomically; refused (False) when the stored one was
        generated from more events, or the user has no events (forgotten meanwhile)."""
        fields = encode_knowledge(record)
        args = [int(record.events_at), *(part for pair in fields.items() for part in pair)]
        keys = [knowledge_key(self.settings.redis_prefix, user_id), events_key(self.settings.redis_prefix, user_id)]
        return bool(await self._put_knowledge(keys=keys, args=args))

    async def read_page(self, user_id: str, limit: int, offset: int = 0, length: int | None = None) -> HistoryPage:
        """Up to ``limit`` events newest first, skipping the ``offset`` newest, and the profile: one
        round trip (LLEN + LRANGE + HGETALL in MULTI/EXEC, so all three see the same moment).

        The first page (``length`` None) counts from the end of the list and reports the length it
        saw; later pages pass that length back with their offset, which pins each page to positions
        counted from the oldest event. Appends only add at the end, so events written between pages
        neither shift nor repeat a page (they show on a new first page). Once the history is at its
        cap, each append also drops the oldest event, moving every position by one: a later page
        then repeats as many newer events as were dropped meanwhile.
        """
        if limit < 1 or offset < 0 or (length is not None and length < 0):
            raise ValueError(f"limit must be positive and offset, length not negative: {limit}, {offset}, {length}")
        ev_key, prof_key = self._keys(user_id)
        async with pipeline(self._redis, transaction=True) as pipe:
            pipe.llen(ev_key)
            if length is None:
                pipe.lrange(ev_key, -(offset + limit), -(offset + 1))
            elif length - offset > 0:
                pipe.lrange(ev_key, max(length - offset - limit, 0), length - offset - 1)
            pipe.hgetall(prof_key)
            replies = await pipe.execute()
        stored, raw_profile = int(replies[0]), replies[-1]
        records = replies[1] if len(replies) == 3 else []
        seen = stored if length is None else length
        start = max(seen - offset - limit, 0)  # position of the page's oldest event
        items, ratings, timestamps = decode_records(records)
        profile = {k.decode(): v.decode() for k, v in raw_profile.items()}
        return HistoryPage(items[::-1], ratings[::-1], timestamps[::-1], profile, exists=bool(stored or profile),
                           length=seen, next_offset=seen - start if records and start > 0 else None)

    async def append(self, user_id: str, events: Sequence[Event]) -> int:
        """Append events atomically and return the number stored afterwards (after the cap).

        ``events`` must be in non-decreasing timestamp order and no older than the user's latest
        stored event; otherwise ``HistoryOrderError`` is raised and nothing is written. The check
        runs inside the script, so it holds against concurrent appends too.
        """
        return (await self.append_counted(user_id, events)).stored

    async def append_counted(self, user_id: str, events: Sequence[Event]) -> AppendResult:
        """``append``, answering also the user's event count and their knowledge record's stamp."""
        ev_key, _ = self._keys(user_id)
        prefix = self.settings.redis_prefix
        cnt_key, kn_key = count_key(prefix, user_id), knowledge_key(prefix, user_id)
        if not events:
            async with pipeline(self._redis, transaction=True) as pipe:
                pipe.llen(ev_key)
                pipe.get(cnt_key)
                pipe.hmget(kn_key, ["events_at", "encoder", "dim"])
                pipe.hstrlen(kn_key, "vector")
                stored, count, stamp, size = _raise_but_knowledge(await pipe.execute(raise_on_error=False),
                                                                  at=(2, 3))
            known = not isinstance(stamp, Exception) and not isinstance(size, Exception)
            return AppendResult(int(stored), int(stored) if count is None else int(count),
                                decode_stamp(*stamp, size) if known else None)
        timestamps = np.fromiter((int(e.timestamp) for e in events), dtype=np.int64, count=len(events))
        check_order(timestamps, user_id)
        items = np.fromiter((int(e.item) for e in events), dtype=np.int64, count=len(events))
        ratings = np.fromiter((float(e.rating) for e in events), dtype=np.float32, count=len(events))
        if not np.isfinite(ratings).all():
            raise ValueError(f"events of user {user_id!r} carry a non-finite rating")
        cap = self.settings.history_max_events
        records = encode_records(items[-cap:], ratings[-cap:], timestamps[-cap:])
        args = [cap, int(timestamps[0]), len(events), *records]
        keys = [ev_key, cnt_key, kn_key]
        if self.settings.events_durable:
            reply, local = await self._append_durable(keys, args)
        else:
            reply = await self._append(keys=keys, args=args)
            local = 1
        if not reply[0]:
            raise HistoryOrderError(f"event at {int(timestamps[0])} is older than the latest stored event "
                                    f"of user {user_id!r} at {int(reply[1])}; nothing was written")
        if int(local) < 1:
            raise RedisTimeoutError(f"the events were written but not confirmed on disk within "
                                    f"{DURABLE_TIMEOUT_MS} ms")
        return AppendResult(int(reply[1]), int(reply[2]), decode_stamp(*reply[3]) if reply[3] else None)

    async def _append_durable(self, keys: list[str], args: list) -> tuple[list, int]:
        """The append script and WAITAOF in one pipeline, so both go over one connection (WAITAOF
        waits for the writes of its own connection): the script's reply and whether the write was
        confirmed on disk (0 or 1).

        On a cluster the pipeline goes to the master of the user's slot, on that node's one
        connection, and WAITAOF also waits for one replica's AOF. A WAIT for that replica comes
        first: it makes the replica acknowledge at once, so the WAITAOF after it reads the
        replica's AOF offset without waiting for its once-a-second report (with ``appendfsync
        always`` on the replicas a durable append then takes milliseconds, not a second). A
        script redirected elsewhere (MOVED/ASK: the slot moved) ran nowhere and is sent again."""
        replicas = 1 if is_cluster(self._redis) else 0
        for _ in range(3):  # again only after loading the script (a new master lacks it) or a MOVED
            async with pipeline(self._redis, transaction=False) as pipe:
                target = {"target_nodes": self._redis.get_node_from_key(keys[0])} if replicas else {}
                # EVALSHA by name: redis-py's cluster pipeline refuses its evalsha() method, not the command.
                pipe.execute_command("EVALSHA", self._append.sha, len(keys), *keys, *args)
                if replicas:
                    pipe.execute_command("WAIT", replicas, DURABLE_TIMEOUT_MS, **target)
                pipe.execute_command("WAITAOF", 1, replicas, DURABLE_TIMEOUT_MS, **target)
                redirect = {"allow_redirections": False} if replicas else {}
                replies = await pipe.execute(raise_on_error=False, **redirect)
                if isinstance(replies[0], NoScriptError):  # nothing ran
                    await self._redis.script_load(_APPEND_LUA)
                    continue
                if isinstance(replies[0], AskError):  # MOVED too: the node refused, nothing ran
                    await rediscover(self._redis)
                    continue
                for result in replies:  # raised inside the pipeline: a cluster's refusal is unavailability
                    if isinstance(result, Exception):
                        raise result
            local, copies = int(replies[-1][0]), int(replies[-1][1])
            return replies[0], int(local >= 1 and copies >= replicas)
        raise ClusterUnavailable("the user's slot kept moving or the append script could not be loaded; "
                                 "nothing was written")

    async def check_durable(self) -> None:
        """Refuse (RuntimeError, saying why) when the server cannot confirm writes on disk: WAITAOF
        needs Redis 7.2+ (or Valkey 8) with ``appendonly yes``, on every master of a cluster."""
        try:
            await self._redis.execute_command("WAITAOF", 1, 0, DURABLE_TIMEOUT_MS,
                                              **({"target_nodes": "primaries"} if is_cluster(self._redis) else {}))
        except ResponseError as exc:
            raise RuntimeError(f"events_durable needs a Redis that confirms writes on disk (WAITAOF, Redis 7.2+ "
                               f"with appendonly yes); this server answered: {exc}") from None

    async def set_profile(self, user_id: str, profile: Mapping[str, str], replace: bool = True) -> None:
        """Write profile fields; ``replace`` drops fields not in ``profile`` (atomically, MULTI/EXEC)."""
        _, prof_key = self._keys(user_id)
        mapping = {str(k): str(v) for k, v in profile.items()}
        if not replace and not mapping:
            return
        async with pipeline(self._redis, transaction=replace) as pipe:
            if replace:
                pipe.delete(prof_key)
            if mapping:
                pipe.hset(prof_key, mapping=mapping)
            await pipe.execute()

    async def delete(self, user_id: str) -> None:
        """Forget a user: history, profile, event count and knowledge record."""
        await self._redis.delete(*user_keys(self.settings.redis_prefix, user_id))

    async def ping(self) -> bool:
        try:
            return await ping_client(self._redis)
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()


def _raise_but_knowledge(replies: list, at: tuple[int, ...] = (2,)) -> list:
    """Raise the first failed reply, unless it is the knowledge record's (indices ``at``): a key of
    another type there is a malformed record, which reads as none, not as a failed read."""
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception) and not (i in at and isinstance(reply, ResponseError)):
            raise reply
    return replies


def _history(records: list[bytes], raw_profile: dict[bytes, bytes],
             raw_knowledge: dict[bytes, bytes] | ResponseError) -> UserHistory:
    items, ratings, timestamps = decode_records(records)
    profile = {k.decode(): v.decode() for k, v in raw_profile.items()}
    try:
        if isinstance(raw_knowledge, ResponseError):
            raise KnowledgeFormatError(f"knowledge record unreadable: {raw_knowledge}")
        knowledge, error = decode_knowledge(raw_knowledge), None
    except KnowledgeFormatError as exc:
        knowledge, error = None, str(exc)
    return UserHistory(items, ratings, timestamps, profile, exists=bool(records or profile), knowledge=knowledge,
                       knowledge_error=error)
