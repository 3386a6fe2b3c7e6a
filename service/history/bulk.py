"""Offline bulk load of many users' histories, profiles and knowledge vectors (``reclora
load-histories``).

Synchronous redis-py with a progress bar: a tool for operators, not for the request path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
from redis.client import Pipeline

from service.config import HistorySettings
from service.history.clients import SyncRedis, sync_client
from service.history.layout import (KnowledgeRecord, check_layout, check_order, count_key, encode_knowledge,
                                    encode_records, events_key, knowledge_key, profile_key)

UserRecords = tuple[str, np.ndarray, np.ndarray, np.ndarray, Mapping[str, str]]
UserKnowledge = tuple[str, KnowledgeRecord | None]
# Where to load: the store's settings (a single node or a cluster; their connection fields, the key
# prefix being an argument of its own) or a single node's URL.
Target = HistorySettings | str


def _connect(target: Target) -> SyncRedis:
    settings = target if isinstance(target, HistorySettings) else HistorySettings(redis_url=target)
    return sync_client(settings, timeout_s=60.0)


def bulk_load(target: Target, histories: Iterable[UserRecords], *, prefix: str = "", max_events: int = 1000,
              batch_users: int = 500, progress: bool = True, total: int | None = None) -> dict[str, int]:
    """Replace the stored history, profile and event count of every user in ``histories``;
    idempotent. Knowledge records stay as they are (``bulk_load_knowledge`` writes them).

    ``histories`` yields (user_id, items, ratings, timestamps, profile), each user's behaviours
    oldest first. Many users go in one pipelined round trip. Each key is built under a staging
    name and RENAMEd into place, so a gateway reading during the load sees a user's old or new
    history, never a half-written one. Events appended to a user while the load runs are lost.
    On a cluster the staging key shares the user's hash tag, so each RENAME stays in one slot and
    redis-py's cluster pipeline sends each master its users' commands.
    """
    from tqdm import tqdm

    check_layout(prefix, max_events)
    if batch_users < 1:
        raise ValueError(f"batch_users must be at least 1, got {batch_users}")
    client = _connect(target)
    counts = {"users": 0, "events": 0, "truncated": 0, "profiles": 0}
    try:
        client.ping()  # fail before reading any input when Redis is unreachable
        pipe = client.pipeline(transaction=False)
        rows = tqdm(histories, total=total, unit="user", disable=not progress)
        for user_id, items, ratings, timestamps, profile in _flushing(pipe, rows, batch_users):
            user_id = str(user_id)
            timestamps = np.asarray(timestamps, dtype=np.int64)
            check_order(timestamps, user_id)
            records = encode_records(np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float32),
                                     timestamps)[-max_events:]
            mapping = {str(k): str(v) for k, v in profile.items()}
            _queue_replace(pipe, events_key(prefix, user_id), records=records)
            _queue_replace(pipe, profile_key(prefix, user_id), mapping=mapping)
            if len(timestamps):  # every event, also those past the cap: what refreshes count against
                pipe.set(count_key(prefix, user_id), len(timestamps))
            else:
                pipe.delete(count_key(prefix, user_id))
            counts["users"] += 1
            counts["events"] += len(records)
            counts["truncated"] += len(timestamps) - len(records)
            counts["profiles"] += bool(mapping)
    finally:
        client.close()
    return counts


def bulk_load_knowledge(target: Target, records: Iterable[UserKnowledge], *, prefix: str = "",
                        batch_users: int = 500, progress: bool = True, total: int | None = None) -> dict[str, int]:
    """Replace the knowledge record of every user in ``records`` ((user_id, record), None for a
    user without a vector: their stored record is deleted); idempotent, each record renamed into
    place whole. Returns how many vectors were written and how many users had none."""
    from tqdm import tqdm

    check_layout(prefix, 1)
    if batch_users < 1:
        raise ValueError(f"batch_users must be at least 1, got {batch_users}")
    client = _connect(target)
    counts = {"vectors": 0, "without": 0}
    try:
        client.ping()
        pipe = client.pipeline(transaction=False)
        rows = tqdm(records, total=total, unit="user", disable=not progress)
        for user_id, record in _flushing(pipe, rows, batch_users):
            key = knowledge_key(prefix, str(user_id))
            _queue_replace(pipe, key, mapping=None if record is None else encode_knowledge(record))
            counts["vectors" if record is not None else "without"] += 1
    finally:
        client.close()
    return counts


def _flushing(pipe: Pipeline, rows: Iterable, every: int) -> Iterator:
    """Yield ``rows``; the caller queues each row's commands, and ``pipe`` is sent after every
    ``every`` rows and once more at the end (many users per round trip)."""
    pending = 0
    for row in rows:
        yield row
        pending += 1
        if pending >= every:
            pipe.execute()
            pending = 0
    if pending:
        pipe.execute()


def _queue_replace(pipe: Pipeline, key: str, records: Sequence[bytes] = (),
                   mapping: Mapping[str, str | bytes] | None = None) -> None:
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
    # RENAME by name: redis-py's cluster pipeline refuses its rename() method (which could cross
    # slots); the staging key shares ``key``'s hash tag, so this one stays in the user's slot.
    pipe.execute_command("RENAME", staging, key)
