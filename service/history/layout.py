"""The stored layout of user histories in Redis: key names, the record format, and the errors
both the gateway's store and the offline bulk loader raise.

Key layout (the ``{u:<user_id>}`` hash tag keeps a user's keys on one Redis Cluster slot, so the
read pipeline and the append script never cross slots):

- ``<prefix>{u:<user_id>}:events``  LIST of behaviour records, oldest first, capped to the most
  recent ``max_events``;
- ``<prefix>{u:<user_id>}:profile`` HASH of profile fields (str -> str).

User ids are the raw (external) ids as strings and items are raw item ids, because product
services know those; mapping to the model's dense ids is the model's job and changes per bundle.

Record encoding: one fixed-width 20-byte little-endian struct per behaviour, ``RECORD`` =
(item int64, timestamp int64 seconds, rating float32), decoded with a single ``np.frombuffer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from redis.exceptions import RedisError

RECORD = np.dtype([("item", "<i8"), ("timestamp", "<i8"), ("rating", "<f4")])  # packed, 20 bytes
RECORD_SIZE = RECORD.itemsize

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


def check_layout(prefix: str, max_events: int) -> None:
    # A brace in the prefix would become the cluster hash tag instead of {u:<id>}.
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"key prefix must not contain braces, got {prefix!r}")
    if max_events < 1:
        raise ValueError(f"max_events must be at least 1, got {max_events}")


def user_tag(prefix: str, user_id: str) -> str:
    """``<prefix>{u:<user_id>}``: the start of every key of one user (one Redis Cluster slot)."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
    return f"{prefix}{{u:{user_id}}}"


def events_key(prefix: str, user_id: str) -> str:
    return f"{user_tag(prefix, user_id)}:events"


def profile_key(prefix: str, user_id: str) -> str:
    return f"{user_tag(prefix, user_id)}:profile"


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


def check_order(timestamps: np.ndarray, user_id: str) -> None:
    if len(timestamps) > 1 and bool((np.diff(timestamps) < 0).any()):
        raise HistoryOrderError(f"events of user {user_id!r} are not in non-decreasing timestamp order")


