"""Constrained wire field types shared by the endpoints.

Ids are strict JSON integers within int64 (the history store and catalog keep int64), so
``"5"``, ``5.0``, ``true`` and ``1e30`` are refused with a 422 instead of being coerced or
overflowing later. User ids are short tokens of a safe charset: they become part of Redis keys,
where a brace would change the cluster hash tag.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

INT64_MAX = 2**63 - 1
USER_ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"

UserId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=128, pattern=USER_ID_PATTERN),
                   Field(description="The product's user id: 1-128 letters, digits, '.', '_', ':', '@', '-'.",
                         examples=["196"])]
ItemId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX, description="Raw catalog item id.")]
