"""History store: each user's lifelong behaviour list and profile in Redis.

``layout`` (keys and record format), ``store`` (the gateway's async store), ``bulk`` (the offline
bulk loader).
"""

from service.history.bulk import bulk_load
from service.history.layout import (
    RECORD,
    Event,
    HistoryFormatError,
    HistoryOrderError,
    UserHistory,
    decode_records,
    encode_records,
    events_key,
    profile_key,
)
from service.history.store import HistoryReader, HistorySettings, HistoryStore

__all__ = ["RECORD", "Event", "HistoryFormatError", "HistoryOrderError", "HistoryReader", "HistorySettings",
           "HistoryStore", "UserHistory", "bulk_load", "decode_records", "encode_records", "events_key",
           "profile_key"]
