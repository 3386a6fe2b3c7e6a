"""HTTP transport of ``GET /v1/users/{user_id}/history``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import HistoryDep
from service.api.errors import ERROR_RESPONSES
from service.api.fields import PathUserId
from service.api.users import serving
from service.api.users.protocol import CURSOR_PATTERN, DEFAULT_LIMIT, MAX_LIMIT, HistoryResponse

router = APIRouter(prefix="/v1", tags=["history"])

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Events per page.")]
Cursor = Annotated[str | None, Query(pattern=CURSOR_PATTERN, description=(
    "The previous page's `next_cursor`, opaque; omit for the newest events."))]


@router.get("/users/{user_id}/history", response_model=HistoryResponse,
            responses={422: ERROR_RESPONSES[422], 503: ERROR_RESPONSES[503]})
async def get_history(user_id: PathUserId, history: HistoryDep, limit: Limit = DEFAULT_LIMIT,
                      cursor: Cursor = None) -> HistoryResponse:
    """What the service stores for a user: events newest first, paged, and the profile."""
    return await serving.history(user_id, limit, cursor, history=history)
