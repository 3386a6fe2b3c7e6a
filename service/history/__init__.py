"""History store: each user's lifelong behaviour list and profile in Redis.

``layout`` (keys and record formats, the user's knowledge vector record), ``store`` (the gateway's
async store), ``bulk`` (the offline bulk loader).
"""

from service.history.bulk import bulk_load, bulk_load_knowledge
from service.history.layout import (
    RECORD,
    AppendResult,
    Event,
    HistoryFormatError,
    HistoryOrderError,
    KnowledgeFormatError,
    KnowledgeRecord,
    KnowledgeStamp,
    UserHistory,
    count_key,
    decode_knowledge,
    decode_records,
    encode_knowledge,
    encode_records,
    events_key,
    knowledge_key,
    profile_key,
)
from service.config import HistorySettings
from service.history.store import HistoryReader, HistoryStore

__all__ = ["RECORD", "AppendResult", "Event", "HistoryFormatError", "HistoryOrderError", "HistoryReader",
           "HistorySettings", "HistoryStore", "KnowledgeFormatError", "KnowledgeRecord", "KnowledgeStamp",
           "UserHistory", "bulk_load", "bulk_load_knowledge", "count_key", "decode_knowledge", "decode_records",
           "encode_knowledge", "encode_records", "events_key", "knowledge_key", "profile_key"]
