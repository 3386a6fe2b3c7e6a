"""Wire types of ``POST /v1/events`` and ``PUT /v1/users/{user_id}/profile``.

Configured bounds (batch size, rating range, how far in the future a timestamp may lie) and the
catalog check run in ``serving``; both report in the same error schema.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.api.fields import INT64_MAX, ItemId, UserId

MAX_PROFILE_FIELDS = 64

ProfileKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
ProfileValue = Annotated[str, StringConstraints(strict=True, max_length=256)]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: ItemId
    rating: Annotated[float, Field(strict=True, allow_inf_nan=False, examples=[4.0])]
    timestamp: Annotated[int, Field(strict=True, gt=0, le=INT64_MAX, description="Unix time in seconds.",
                                    examples=[1700000000])]


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId
    events: list[EventIn] = Field(min_length=1, description="Oldest first; none older than the user's latest stored.")


class EventsResponse(BaseModel):
    appended: int = Field(description="Events written (all of the request's).")
    history_length: int = Field(description="Behaviours stored for the user afterwards (capped).")


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A key off the pattern is refused, so the schema says so: patternProperties alone would let
    # any other key through (JSON Schema's additionalProperties defaults to true).
    profile: dict[ProfileKey, ProfileValue] = Field(
        max_length=MAX_PROFILE_FIELDS, description="Replaces the stored profile; {} clears it.",
        examples=[{"age": "24", "gender": "M", "occupation": "technician"}],
        json_schema_extra={"additionalProperties": False})


class ProfileResponse(BaseModel):
    user_id: str
    fields: int = Field(description="Profile fields stored.")
