"""Event and profile intake: configured checks, catalog check, then one atomic store write.

Nothing is dropped silently: an event batch is written whole or the caller gets an error saying
why (409 out of order, 422 bad input, 503 store unreachable). A written batch is handed to the
online evaluation, which labels the scores served to the user for those items off the request
path, and to the knowledge refresh, which queues a background job when the user's knowledge
vector is due: the answer never waits for either, and their failures are counted, never the event's.
"""

from __future__ import annotations

import logging
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api.errors import Conflict, ErrorDetail, InvalidRequest, Unavailable, unknown_items_error
from service.api.events.protocol import EventsRequest, EventsResponse, ProfileRequest, ProfileResponse
from service.config import EventsSettings
from service.history import Event, HistoryOrderError, HistoryStore
from service.metrics import Metrics
from service.scoring.contracts import KnowledgeRefresh, OnlineEvaluation, Scorer

log = logging.getLogger(__name__)


def check_batch(request: EventsRequest, settings: EventsSettings, now: float) -> None:
    """Batch size, rating range, timestamp plausibility and in-batch time order."""
    problems: list[ErrorDetail] = []
    if len(request.events) > settings.max_event_batch:
        problems.append(ErrorDetail(loc="events", type="too_long", message=(
            f"{len(request.events)} events; at most {settings.max_event_batch} per request")))
    latest_ok = int(now) + settings.max_event_future_s
    for i, event in enumerate(request.events):
        if not settings.rating_min <= event.rating <= settings.rating_max:
            problems.append(ErrorDetail(loc=f"events[{i}].rating", type="out_of_range", message=(
                f"rating {event.rating} is outside [{settings.rating_min}, {settings.rating_max}]")))
        if event.timestamp > latest_ok:
            problems.append(ErrorDetail(loc=f"events[{i}].timestamp", type="in_future", message=(
                f"timestamp {event.timestamp} is more than {settings.max_event_future_s} s in the future; "
                "timestamps are Unix seconds")))
        if i and event.timestamp < request.events[i - 1].timestamp:
            problems.append(ErrorDetail(loc=f"events[{i}].timestamp", type="out_of_order", message=(
                f"timestamp {event.timestamp} is earlier than the previous event's "
                f"{request.events[i - 1].timestamp}; send events oldest first")))
    if problems:
        raise InvalidRequest(problems)


async def append_events(request: EventsRequest, *, history: HistoryStore, scorer: Scorer, settings: EventsSettings,
                        metrics: Metrics, online: OnlineEvaluation | None = None,
                        knowledge: KnowledgeRefresh | None = None) -> EventsResponse:
    check_batch(request, settings, time.time())
    unknown = scorer.unknown_items(list(dict.fromkeys(e.item_id for e in request.events)))
    if unknown:
        located = ((f"events[{i}].item_id", e.item_id) for i, e in enumerate(request.events))
        raise unknown_items_error(located, unknown, scorer.model_version)
    events = [Event(item=e.item_id, rating=e.rating, timestamp=e.timestamp) for e in request.events]
    try:
        appended = await history.append_counted(request.user_id, events)
    except HistoryOrderError as exc:
        raise Conflict(str(exc), code="out_of_order") from exc
    except RedisConnectionError as exc:
        log.warning("history store unreachable; events refused", extra={"error": repr(exc)})
        raise Unavailable("the history store is unreachable; nothing was written, retry later",
                          code="history_unavailable") from exc
    except RedisTimeoutError as exc:
        log.warning("history store timed out during append", extra={"error": repr(exc)})
        raise Unavailable("the history store timed out; the events may or may not have been written",
                          code="history_timeout") from exc
    metrics.events_appended.inc(len(events))
    if online is not None:
        online.observe(request.user_id, [(e.item, e.rating) for e in events])
    if knowledge is not None:
        try:
            knowledge.observe(request.user_id, appended)
        except Exception:  # the events are written: a refresh that cannot be queued never fails them
            log.exception("queueing a knowledge refresh failed")
    return EventsResponse(appended=len(events), history_length=appended.stored)


async def set_profile(user_id: str, request: ProfileRequest, *, history: HistoryStore) -> ProfileResponse:
    try:
        await history.set_profile(user_id, request.profile, replace=True)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("history store unavailable; profile refused", extra={"error": repr(exc)})
        raise Unavailable("the history store is unavailable; the profile may not have been written, retry",
                          code="history_unavailable") from exc
    return ProfileResponse(user_id=user_id, fields=len(request.profile))
