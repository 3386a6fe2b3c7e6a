"""Reading a user's stored history page by page: one store round trip per page."""

from __future__ import annotations

import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api.errors import Unavailable
from service.api.users.protocol import HistoryEvent, HistoryResponse, decode_cursor, encode_cursor
from service.history import HistoryStore

log = logging.getLogger(__name__)


async def history(user_id: str, limit: int, cursor: str | None, *, history: HistoryStore) -> HistoryResponse:
    offset, length = (0, None) if cursor is None else decode_cursor(cursor)
    try:
        page = await history.read_page(user_id, limit, offset, length)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("history store unavailable; history not read", extra={"error": repr(exc)})
        raise Unavailable("the history store is unavailable; retry later", code="history_unavailable") from exc
    # Ratings are stored as float32: str() gives the shortest decimal that is that float32, so a
    # rating sent as 4.3 reads back as 4.3 rather than as 4.300000190734863.
    ratings = [float(str(rating)) for rating in page.ratings]
    events = [HistoryEvent(item_id=item, rating=rating, timestamp=ts)
              for item, rating, ts in zip(page.items.tolist(), ratings, page.timestamps.tolist())]
    next_cursor = None if page.next_offset is None else encode_cursor(page.next_offset, page.length)
    return HistoryResponse(user_id=user_id, exists=page.exists, events=events, profile=page.profile,
                           next_cursor=next_cursor)
