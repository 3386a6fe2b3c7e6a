"""One error schema for every non-2xx answer, and the handlers that produce it.

``{"error": {"code", "message", "details": [{"loc", "message", "type"}], "request_id"}}``: a
caller parses one shape whatever went wrong, and ``details`` points at each offending field as a
path such as ``candidates[3]`` or ``events[0].rating``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from service.logging import request_id_var

log = logging.getLogger(__name__)

MAX_MESSAGE_PROBLEMS = 5
MAX_LISTED_IDS = 20  # unknown item ids named in a message; details name every one
_HTTP_CODES = {413: "content_too_large", 422: "invalid_request"}  # RFC 9110 names, whatever the Python version


class ErrorDetail(BaseModel):
    loc: str | None = Field(None, description="Where the problem is, e.g. 'candidates[3]'; null for the whole request.")
    message: str
    type: str = Field(description="Machine-readable kind, e.g. 'less_than_equal', 'unknown_item'.")


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. 'invalid_request'.")
    message: str = Field(description="Human-readable summary.")
    details: list[ErrorDetail] = Field(default_factory=list)
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An expected failure with its HTTP status; raised by serving code, rendered by the handler."""

    status_code = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Sequence[ErrorDetail] = (),
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.details = list(details)
        self.headers = dict(headers or {})


class InvalidRequest(ApiError):
    """Well-formed but unacceptable input (limits from settings, unknown items)."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_request"

    def __init__(self, details: Sequence[ErrorDetail], *, code: str | None = None, message: str | None = None) -> None:
        super().__init__(message or summarize(details), code=code, details=details)


def unknown_items_error(located: Iterable[tuple[str, int]], unknown: Iterable[int], model_version: str) -> InvalidRequest:
    """The 422 naming every (location, item id) pair whose item the catalog of ``model_version``
    does not know."""
    unknown = set(unknown)
    details = [ErrorDetail(loc=loc, message=f"unknown item {item}", type="unknown_item")
               for loc, item in located if item in unknown]
    ids = sorted(unknown)
    listed = ", ".join(map(str, ids[:MAX_LISTED_IDS])) + (", ..." if len(ids) > MAX_LISTED_IDS else "")
    return InvalidRequest(details, code="unknown_items",
                          message=f"{len(ids)} item id(s) not in the catalog of model {model_version}: {listed}")


class MalformedBody(HTTPException):
    """A request body refused while it is read, before it is parsed (nested too deep): raised from
    the body reader, which FastAPI passes on as it does the 413; rendered as a 422 at loc 'body'."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(HTTPStatus.UNPROCESSABLE_ENTITY, message)
        self.kind = kind


def is_json_media_type(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON: application/json or application/*+json."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    kind, _, subtype = media_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


class Conflict(ApiError):
    status_code = HTTPStatus.CONFLICT
    code = "conflict"


class Unavailable(ApiError):
    """A dependency is down or not ready yet; worth retrying shortly."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"

    def __init__(self, message: str, *, code: str | None = None, details: Sequence[ErrorDetail] = (),
                 retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, details=details, headers={"Retry-After": str(retry_after_s)})


class Overloaded(ApiError):
    """Past a bound of this gateway (requests in flight, work queued): retry after the header's seconds."""

    status_code = HTTPStatus.TOO_MANY_REQUESTS
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


def summarize(details: Sequence[ErrorDetail]) -> str:
    """'candidates[3]: ...; deadline_ms: ...' for the first few problems."""
    parts = [f"{d.loc}: {d.message}" if d.loc else d.message for d in details[:MAX_MESSAGE_PROBLEMS]]
    if len(details) > MAX_MESSAGE_PROBLEMS:
        parts.append(f"and {len(details) - MAX_MESSAGE_PROBLEMS} more")
    return "; ".join(parts) or "invalid request"


def format_loc(loc: Iterable[str | int]) -> str | None:
    """('body', 'events', 0, 'rating') -> 'events[0].rating'; other sources keep their name: 'path.user_id'."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def error_response(status: int, code: str, message: str, details: Sequence[ErrorDetail] = (),
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=list(details),
                                         request_id=request_id_var.get()))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=dict(headers or {}))


_NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})
_JSON_KINDS: tuple[tuple[type, str], ...] = ((bool, "a boolean"), (int, "a number"), (float, "a number"),
                                             (str, "a string"), (list, "an array"))


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_KINDS if isinstance(value, kind)), type(value).__name__)


def _validation_detail(err: Mapping[str, Any], content_type: str | None) -> ErrorDetail:
    if err["type"] == "json_invalid":  # FastAPI reports the byte offset as the location
        reason = (err.get("ctx") or {}).get("error", "malformed")
        return ErrorDetail(loc="body", message=f"invalid JSON at character {err['loc'][-1]}: {reason}",
                           type="json_invalid")
    if tuple(err["loc"]) == ("body",) and err["type"] in _NOT_AN_OBJECT:
        # The whole body is not an object: either it was not sent as JSON (FastAPI then hands the
        # model the raw bytes) or it is JSON of another kind. Pydantic's message names neither.
        if not is_json_media_type(content_type):
            got = f"'{content_type}'" if content_type else "none"
            return ErrorDetail(loc="body", type="unsupported_content_type",
                               message=f"expected Content-Type application/json, got {got}")
        return ErrorDetail(loc="body", type="body_not_object",
                           message=f"the body must be a JSON object, got {_json_kind(err.get('input'))}")
    return ErrorDetail(loc=format_loc(err["loc"]), message=err["msg"], type=err["type"])


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type")
    details = [_validation_detail(e, content_type) for e in exc.errors()]
    return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_request", summarize(details), details)


def _body_error(detail: ErrorDetail) -> JSONResponse:
    return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_request", summarize([detail]), [detail])


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc, MalformedBody):
        return _body_error(ErrorDetail(loc="body", message=exc.detail, type=exc.kind))
    if exc.status_code == HTTPStatus.BAD_REQUEST and isinstance(exc.__cause__, ValueError):
        # FastAPI's "error parsing the body": undecodable bytes or numbers too long to parse.
        return _body_error(ErrorDetail(loc="body", message=f"unreadable JSON body: {exc.__cause__}",
                                       type="json_invalid"))
    if exc.status_code == HTTPStatus.BAD_REQUEST and isinstance(exc.__cause__, RecursionError):
        # The body reader's depth limit (middleware) normally refuses such a body before the parser.
        return _body_error(ErrorDetail(loc="body", message="JSON nested too deeply to parse", type="json_too_deep"))
    status = HTTPStatus(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else status.phrase
    code = _HTTP_CODES.get(status) or status.phrase.lower().replace(" ", "_").replace("-", "_")
    return error_response(status, code, message, headers=exc.headers)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


def internal_error_response() -> JSONResponse:
    """The answer to an unexpected exception: the schema, no internals (they go to the log)."""
    return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error",
                          "internal error; quote the request id when reporting it")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are answered by the request middleware."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(ApiError, _on_api_error)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Invalid request; `details` lists each problem."},
    429: {"model": ErrorResponse, "description": "Overloaded: nothing was done; retry after `Retry-After` seconds."},
    503: {"model": ErrorResponse, "description": "A dependency is unavailable; retry after `Retry-After`."},
}
