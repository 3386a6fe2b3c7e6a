"""HTTP transport of event and profile intake."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import HistoryDep, KnowledgeDep, MetricsDep, OnlineDep, ScorerDep, SettingsDep
from service.api.errors import ERROR_RESPONSES, ErrorResponse
from service.api.events import serving
from service.api.events.protocol import EventsRequest, EventsResponse, ProfileRequest, ProfileResponse
from service.api.fields import USER_ID_PATTERN

router = APIRouter(prefix="/v1", tags=["history"])

PathUserId = Annotated[str, Path(min_length=1, max_length=128, pattern=USER_ID_PATTERN)]


@router.post("/events", response_model=EventsResponse,
             responses={**ERROR_RESPONSES, 409: {"model": ErrorResponse, "description": "Events out of time order."}})
async def append_events(body: EventsRequest, history: HistoryDep, scorer: ScorerDep, settings: SettingsDep,
                        metrics: MetricsDep, online: OnlineDep, knowledge: KnowledgeDep) -> EventsResponse:
    """Append a user's new behaviours to their history, atomically and in time order; they label
    the scores served to the user for those items (online evaluation), and every so many of them
    refresh the user's knowledge vector in the background."""
    return await serving.append_events(body, history=history, scorer=scorer, settings=settings.events, metrics=metrics,
                                       online=online, knowledge=knowledge)


@router.put("/users/{user_id}/profile", response_model=ProfileResponse, responses=ERROR_RESPONSES)
async def put_profile(user_id: PathUserId, body: ProfileRequest, history: HistoryDep) -> ProfileResponse:
    """Replace a user's profile fields (the CRM's user features)."""
    return await serving.set_profile(user_id, body, history=history)
