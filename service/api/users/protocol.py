"""Wire types of ``GET /v1/users/{user_id}/history``, and its page cursor.

The cursor is opaque to callers: pass back the ``next_cursor`` of the previous page. It carries the
number of newer events already returned and the list length the first page saw, so every string
of its published pattern names a page (perhaps an empty one) and none is refused.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
CURSOR_PATTERN = r"^[0-9]{1,18}\.[0-9]{1,18}$"
_CURSOR = re.compile(r"([0-9]{1,18})\.([0-9]{1,18})")


def encode_cursor(offset: int, length: int) -> str:
    """The cursor of the page after ``offset`` newer events, counted against a list of ``length``."""
    return f"{length}.{offset}"


def decode_cursor(cursor: str) -> tuple[int, int]:
    """``(offset, length)`` of a cursor matching ``CURSOR_PATTERN`` (the query parameter checked it)."""
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise ValueError(f"not a history cursor: {cursor!r}")
    return int(match.group(2)), int(match.group(1))


class HistoryEvent(BaseModel):
    item_id: int = Field(description="Raw catalog item id.")
    rating: float
    timestamp: int = Field(description="Unix time in seconds.")


class HistoryResponse(BaseModel):
    user_id: str
    exists: bool = Field(description=(
        "False when nothing is stored for the user: no event and no profile field. An unknown user and "
        "one whose history is empty look the same to the store."))
    events: list[HistoryEvent] = Field(description="Newest first; at most `limit`.")
    profile: dict[str, str] = Field(description="The stored profile fields; {} when none.")
    next_cursor: str | None = Field(description=(
        "Pass as `cursor` for the next, older page; null on the last page. Events appended meanwhile do "
        "not shift later pages: they show on a new first page."))
