"""The stored layout of user histories in Redis: key names, the record format, and the errors
both the gateway's store and the offline bulk loader raise.

Key layout (the ``{u:<user_id>}`` hash tag keeps a user's keys on one Redis Cluster slot, so the
read pipeline and the append script never cross slots):

- ``<prefix>{u:<user_id>}:events``  LIST of behaviour records, oldest first, capped to the most
  recent ``max_events``;
- ``<prefix>{u:<user_id>}:profile`` HASH of profile fields (str -> str);
- ``<prefix>{u:<user_id>}:count``   the user's event count: every event ever stored for them, also
  those the cap has dropped since (the nearline knowledge refresh counts new events against it);
- ``<prefix>{u:<user_id>}:knowledge`` HASH, the user's knowledge vector record (``KnowledgeRecord``):
  ``vector`` (raw little-endian float32), ``encoder``, ``dim``, ``events_at`` (the event count it
  was generated from) and ``generated_at`` (Unix seconds). Appends never touch it.

User ids are the raw (external) ids as strings and items are raw item ids, because product
services know those; mapping to the model's dense ids is the model's job and changes per bundle.

Record encoding: one fixed-width 20-byte little-endian struct per behaviour, ``RECORD`` =
(item int64, timestamp int64 seconds, rating float32), decoded with a single ``np.frombuffer``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from redis.exceptions import RedisError

RECORD = np.dtype([("item", "<i8"), ("timestamp", "<i8"), ("rating", "<f4")])  # packed, 20 bytes
RECORD_SIZE = RECORD.itemsize
VECTOR = np.dtype("<f4")  # a knowledge vector's element
KNOWLEDGE_FIELDS = ("vector", "encoder", "dim", "events_at", "generated_at")

class HistoryOrderError(ValueError):
    """Events out of time order: appending them would break the oldest-first history."""


class HistoryFormatError(RedisError):
    """Stored records are not in this format. A RedisError, so callers degrade as for an outage."""


class KnowledgeFormatError(ValueError):
    """A stored knowledge record not in this format: served as absent, never as a vector."""


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
    knowledge: "KnowledgeRecord | None" = None
    knowledge_error: str | None = None  # why a stored knowledge record was ignored (malformed)

    @classmethod
    def empty(cls) -> "UserHistory":
        """A user with nothing stored: what a cold start is scored with."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass(frozen=True, eq=False)
class KnowledgeRecord:
    """One user's knowledge vector, the encoder that made it, the user's event count it was
    generated from (the refresh counts new events against it) and when (Unix seconds)."""

    vector: np.ndarray  # float32 (dim,)
    encoder: str
    events_at: int
    generated_at: float

    def __post_init__(self) -> None:
        vector = np.ascontiguousarray(self.vector, dtype=VECTOR)
        if vector.ndim != 1 or vector.size == 0 or not np.isfinite(vector).all():
            raise KnowledgeFormatError(f"a knowledge vector is a non-empty 1-d array of finite floats, "
                                       f"got shape {vector.shape}")
        if not self.encoder:
            raise KnowledgeFormatError("a knowledge record needs its encoder's name")
        if self.events_at < 0 or not math.isfinite(self.generated_at):
            raise KnowledgeFormatError(f"events_at must be >= 0 and generated_at finite, got "
                                       f"{self.events_at}, {self.generated_at}")
        object.__setattr__(self, "vector", vector)

    @property
    def dim(self) -> int:
        return int(self.vector.size)

    @property
    def stamp(self) -> "KnowledgeStamp":
        return KnowledgeStamp(self.events_at, self.encoder, self.dim)


@dataclass(frozen=True, slots=True)
class KnowledgeStamp:
    """What a refresh decision needs of a stored knowledge record: not its vector."""

    events_at: int
    encoder: str
    dim: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    """After an append: events stored (capped), the user's event count, and the stamp of their
    knowledge record (None when there is none or it is malformed)."""

    stored: int
    count: int
    knowledge: KnowledgeStamp | None = None


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


def count_key(prefix: str, user_id: str) -> str:
    return f"{user_tag(prefix, user_id)}:count"


def knowledge_key(prefix: str, user_id: str) -> str:
    return f"{user_tag(prefix, user_id)}:knowledge"


def user_keys(prefix: str, user_id: str) -> tuple[str, ...]:
    """Every key of one user's stored state (what forgetting the user deletes)."""
    return (events_key(prefix, user_id), profile_key(prefix, user_id), count_key(prefix, user_id),
            knowledge_key(prefix, user_id))


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


def encode_knowledge(record: KnowledgeRecord) -> dict[str, bytes | str]:
    """The record as the fields of its hash."""
    return {"vector": record.vector.tobytes(), "encoder": record.encoder, "dim": str(record.dim),
            "events_at": str(int(record.events_at)), "generated_at": repr(float(record.generated_at))}


def decode_knowledge(raw: Mapping[bytes, bytes]) -> KnowledgeRecord | None:
    """The record in a hash's fields (HGETALL); None when there is none; ``KnowledgeFormatError``
    when the fields are not a record of this format."""
    if not raw:
        return None
    missing = [f for f in KNOWLEDGE_FIELDS if f.encode() not in raw]
    if missing:
        raise KnowledgeFormatError(f"knowledge record lacks {', '.join(missing)}")
    try:
        dim, events_at = int(raw[b"dim"]), int(raw[b"events_at"])
        generated_at, encoder = float(raw[b"generated_at"]), raw[b"encoder"].decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise KnowledgeFormatError(f"knowledge record fields unreadable: {exc}") from None
    blob = raw[b"vector"]
    if dim < 1 or len(blob) != dim * VECTOR.itemsize:
        raise KnowledgeFormatError(f"knowledge vector of {len(blob)} bytes, expected {dim} float32")
    return KnowledgeRecord(np.frombuffer(blob, dtype=VECTOR).copy(), encoder, events_at, generated_at)


def decode_stamp(events_at: bytes | None, encoder: bytes | None, dim: bytes | None,
                 vector_bytes: int) -> KnowledgeStamp | None:
    """A record's stamp from three of its fields and its vector's size; None when there is no
    record or it is malformed (as a read would find it)."""
    try:
        stamp = KnowledgeStamp(int(events_at), encoder.decode(), int(dim))
    except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
        return None
    ok = stamp.events_at >= 0 and stamp.encoder and stamp.dim >= 1 and vector_bytes == stamp.dim * VECTOR.itemsize
    return stamp if ok else None
