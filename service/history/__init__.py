"""History store: each user's lifelong behaviour list and profile in Redis (see ``store``)."""

from service.history.store import (
    RECORD,
    Event,
    HistoryFormatError,
    HistoryOrderError,
    HistorySettings,
    HistoryStore,
    UserHistory,
    bulk_load,
    decode_records,
    encode_records,
    events_key,
    profile_key,
)

__all__ = ["RECORD", "Event", "HistoryFormatError", "HistoryOrderError", "HistorySettings", "HistoryStore",
           "UserHistory", "bulk_load", "decode_records", "encode_records", "events_key", "profile_key"]
