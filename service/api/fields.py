"""Constrained wire field types shared by the endpoints, and the exact-bounds fix of the schema.

Ids are strict JSON integers within int64 (the history store and catalog keep int64), so
``"5"``, ``5.0``, ``true`` and ``1e30`` are refused with a 422 instead of being coerced or
overflowing later (JSON Schema counts ``5.0`` as an integer; this wire takes integer literals
only, and the descriptions say so). User ids are short tokens of a safe charset: they become
part of Redis keys, where a brace would change the cluster hash tag. Many products number their
users, so a JSON integer is a user id too: it is stored and answered as its decimal string
(``1`` and ``"1"`` are the same user); bools and floats are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Path
from pydantic import BeforeValidator, Field, GetJsonSchemaHandler, StringConstraints
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
USER_ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_EXACT_FLOAT_INTS = 2**53  # every integer up to this magnitude survives a trip through a float


def _user_id_from_wire(value: Any) -> Any:
    """An integer id becomes its decimal string; anything but a string or an integer is refused here
    (a bool is not an id, although Python counts it as an int)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PydanticCustomError("user_id_type", "Input should be a valid string or integer")
    if isinstance(value, int):
        if value > INT64_MAX:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}",
                                      {"le": INT64_MAX})
        if value < INT64_MIN:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}",
                                      {"ge": INT64_MIN})
        return str(value)
    return value


class _OrInt64:
    """Publishes the user id as ``string | integer``: the string's own schema, or an int64."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"anyOf": [handler(schema), {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}]}


UserId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=128, pattern=USER_ID_PATTERN),
                   BeforeValidator(_user_id_from_wire), _OrInt64(),
                   Field(description="The product's user id: 1-128 letters, digits, '.', '_', ':', '@', '-'; "
                                     "or an int64 literal, which means its decimal string.", examples=["196"])]
ItemId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX,
                              description="Raw catalog item id: an integer literal (5.0 is refused).")]
PathUserId = Annotated[str, Path(min_length=1, max_length=128, pattern=USER_ID_PATTERN,
                                 description="The product's user id; an integer id as its decimal string.")]


def exact_integer_bounds(spec: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the float bounds of integer schemas in an OpenAPI document as exact integers, in place.

    FastAPI's document model types every bound as a float, so ``le=INT64_MAX`` is published as
    ``9.223372036854776e+18``, which is 2**63: a client trusting it sends a valid-looking id that
    the server refuses. Bounds up to 2**53 come back exactly; a float at 2**63 (or -2**63) can only
    be int64's own limit, since every integer on this wire is an int64. Any other bound that a float
    cannot carry exactly is refused here rather than published wrong."""
    _walk(spec, _fix_bounds)
    return spec


def _walk(node: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def _fix_bounds(schema: dict[str, Any]) -> None:
    kind = schema.get("type")
    if kind != "integer" and not (isinstance(kind, list) and "integer" in kind):
        return
    for key in _BOUND_KEYS:
        value = schema.get(key)
        if not isinstance(value, float) or not value.is_integer():
            continue
        exact = int(value)
        if abs(exact) <= _EXACT_FLOAT_INTS:
            schema[key] = exact
        elif exact == 2**63:
            schema[key] = INT64_MAX
        elif exact == INT64_MIN:
            schema[key] = INT64_MIN
        else:
            raise ValueError(f"integer bound {key}={value!r} cannot be published exactly")
