"""What the sync and async clients share: building each call, the retry policy, reading answers.

A call runs as a generator (``exchange``) that yields its next step, ``Send`` this request or
``Sleep`` this long, and is sent back what the step produced. The clients only carry steps out
(httpx.Client and time.sleep, or httpx.AsyncClient and asyncio.sleep), so every decision exists
once and can be tested without I/O.

The retry policy is written here rather than taken from a retry library: each decision depends on
the answer (``Retry-After`` cut to the budget left; a 503 code saying a write may have happened)
and on whether the call is idempotent, which would all be custom hooks in a library, and every
product service installing this client would carry one more pinned dependency for ~40 lines.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import numbers
import operator
import random
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from reclora_client import errors
from reclora_client.models import (ErrorResponse, Event, EventsResponse, ExplainResponse, HistoryResponse,
                                   ProfileResponse, ScoreResponse)

M = TypeVar("M", bound=BaseModel)
UserIdLike = str | int
EventLike = Event | tuple[int, float, int]

REQUEST_ID_HEADER = "X-Request-ID"
RETRY_STATUSES = frozenset({429, 503})
# 503 codes with which the gateway says a write may have happened (Redis timed out mid-append):
# a call that is not idempotent is not retried on them.
MAYBE_APPLIED_CODES = frozenset({"history_timeout"})


@dataclass(frozen=True)
class Call(Generic[M]):
    """One endpoint call as data: what to send, how long one try may take, what comes back."""

    method: str
    path: str
    response_model: type[M]
    timeout_s: float
    idempotent: bool
    json: Any = None
    params: Mapping[str, str | int] | None = None


@dataclass(frozen=True)
class Send:
    call: Call[Any]
    headers: Mapping[str, str]

    def request_args(self) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.request`` / ``httpx.AsyncClient.request``."""
        c = self.call
        return {"method": c.method, "url": c.path, "json": c.json, "params": c.params,
                "headers": dict(self.headers), "timeout": c.timeout_s}


@dataclass(frozen=True)
class Sleep:
    seconds: float


Outcome = httpx.Response | httpx.TransportError
Steps = Generator[Send | Sleep, Outcome | None, M]


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``retries`` retries, none starting later than ``budget_s`` after the first try.

    A retry waits the answer's ``Retry-After`` when it has one (cut to the budget left: a caller's
    bound beats the server's hint), else an exponential backoff from ``backoff_s``, doubling up
    to ``max_backoff_s``, with jitter.
    """

    retries: int = 2
    backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    budget_s: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.budget_s < 0:
            raise ValueError("retries, backoff_s, max_backoff_s and budget_s must be >= 0")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Equal jitter: half the step fixed, half random, so clients that failed together spread
        out, and none retries at once."""
        step = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(retry, 60))
        return step / 2 + rng.uniform(0.0, step / 2)

    def wait_before_retry(self, retry: int, error: errors.RecLoRAError, idempotent: bool, elapsed_s: float,
                          rng: random.Random) -> float | None:
        """Seconds to wait before retry number ``retry`` (0 = the first), or None to give up."""
        if retry >= self.retries or not should_retry(error, idempotent):
            return None
        left = self.budget_s - elapsed_s
        if left <= 0:
            return None
        wait = error.retry_after_s if error.retry_after_s is not None else self.backoff(retry, rng)
        return min(wait, left)


def should_retry(error: errors.RecLoRAError, idempotent: bool) -> bool:
    """Whether another try can help and cannot do harm.

    429 and 503 mean the gateway refused before acting (except the codes in
    ``MAYBE_APPLIED_CODES``); a request that never left (``ConnectionFailed``) is safe to send
    again. A timeout or a dropped connection after sending is retried only for idempotent calls:
    the gateway may have appended the events already, and since it accepts events at the user's
    latest timestamp, a second append of the same batch would store them twice.
    """
    if isinstance(error, errors.NetworkError):
        return idempotent or not error.request_sent
    if error.status in RETRY_STATUSES:
        return idempotent or error.code not in MAYBE_APPLIED_CODES
    return False


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """``Retry-After`` in seconds: delay-seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # '-0000': UTC by RFC 5322
            when = when.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, when.timestamp() - now())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def error_from_response(response: httpx.Response) -> errors.RecLoRAError:
    """The typed error of a non-2xx answer, from the gateway's error schema when it has one."""
    cls = errors.STATUS_ERRORS.get(response.status_code, errors.RecLoRAError)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    try:
        body = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:  # not the gateway's schema: a proxy or load balancer answered
        text = response.text.strip()[:200]
        return cls(text or response.reason_phrase or "no message", status=response.status_code,
                   code=f"http_{response.status_code}", request_id=response.headers.get(REQUEST_ID_HEADER),
                   retry_after_s=retry_after)
    return cls(body.message, status=response.status_code, code=body.code, details=body.details,
               request_id=body.request_id, retry_after_s=retry_after)


def error_from_transport(exc: httpx.TransportError) -> errors.NetworkError:
    """The typed error of a try that got no answer; says whether the request may have arrived."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return errors.ConnectionFailed(f"{type(exc).__name__}: {exc}", code="connection_failed")
    if isinstance(exc, httpx.TimeoutException):
        return errors.TimedOut(f"{type(exc).__name__}: {exc}", code="timed_out")
    return errors.NetworkError(f"{type(exc).__name__}: {exc}", code="network_error")


def read_answer(call: Call[M], response: httpx.Response) -> M:
    try:
        return call.response_model.model_validate_json(response.content)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise errors.UnexpectedResponse(
            f"{call.method} {call.path} answered {response.status_code} with a body that is not a "
            f"{call.response_model.__name__} ({exc.error_count()} problem(s); first: {first['loc']}: {first['msg']})",
            status=response.status_code, code="unexpected_response",
            request_id=response.headers.get(REQUEST_ID_HEADER)) from None


def exchange(call: Call[M], policy: RetryPolicy, rng: random.Random,
             clock: Callable[[], float] = time.monotonic) -> Steps[M]:
    """Run ``call`` to its parsed answer or its final error, retrying as ``policy`` allows."""
    headers = {REQUEST_ID_HEADER: uuid.uuid4().hex}  # one id for every try: the gateway's logs join them
    started = clock()
    retry = 0
    while True:
        outcome = yield Send(call, headers)
        if isinstance(outcome, httpx.Response):
            if outcome.is_success:
                return read_answer(call, outcome)
            error, cause = error_from_response(outcome), None
        elif isinstance(outcome, httpx.TransportError):
            error, cause = error_from_transport(outcome), outcome
        else:
            raise TypeError(f"a Send step produces a response or a transport error, not {outcome!r}")
        error.attempts = retry + 1
        wait = policy.wait_before_retry(retry, error, call.idempotent, clock() - started, rng)
        if wait is None:
            raise error from cause
        yield Sleep(wait)
        retry += 1


def _as_int(value: Any, what: str) -> int:
    """An integer id or time; ``True`` and ``4.5`` are refused here as the gateway would (it is strict)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None


def wire_user_id(user_id: UserIdLike) -> str:
    """The gateway's user ids are strings on the wire; integer ids go as their decimal string."""
    return user_id if isinstance(user_id, str) else str(_as_int(user_id, "user_id"))


def wire_event(event: EventLike) -> dict[str, Any]:
    if not isinstance(event, Event):
        item_id, rating, timestamp = event
        if isinstance(rating, bool) or not isinstance(rating, numbers.Real):
            raise TypeError(f"rating must be a number, not {type(rating).__name__}")
        event = Event(item_id=_as_int(item_id, "item_id"), rating=float(rating),
                      timestamp=_as_int(timestamp, "timestamp"))
    return event.model_dump()


def user_path(user_id: UserIdLike, tail: str) -> str:
    return f"/v1/users/{quote(wire_user_id(user_id), safe='')}/{tail}"


@dataclass(frozen=True)
class Calls:
    """Builds each endpoint's ``Call`` from the client's settings."""

    timeout_s: float
    default_deadline_ms: int | None
    deadline_margin_s: float

    def score(self, user_id: UserIdLike, candidates: Iterable[int], deadline_ms: int | None) -> Call[ScoreResponse]:
        """One try may take the deadline plus the network margin: the gateway answers by its
        deadline (degraded if need be), so waiting longer only hides a hung connection."""
        return self._scoring("/v1/score", ScoreResponse, user_id, candidates,
                             self.default_deadline_ms if deadline_ms is None else deadline_ms)

    def explain(self, user_id: UserIdLike, candidates: Iterable[int],
                deadline_ms: int | None) -> Call[ExplainResponse]:
        """As ``score``, but without the client's default deadline: None leaves the gateway's
        explain deadline in charge (``timeout_s`` then bounds the try)."""
        return self._scoring("/v1/explain", ExplainResponse, user_id, candidates, deadline_ms)

    def _scoring(self, path: str, model: type[M], user_id: UserIdLike, candidates: Iterable[int],
                 deadline: int | None) -> Call[M]:
        body: dict[str, Any] = {"user_id": wire_user_id(user_id),
                                "candidates": [_as_int(c, "candidate item id") for c in candidates]}
        timeout_s = self.timeout_s
        if deadline is not None:
            deadline = _as_int(deadline, "deadline_ms")
            if deadline <= 0:
                raise ValueError(f"deadline_ms must be > 0, not {deadline}")
            body["deadline_ms"] = deadline
            timeout_s = deadline / 1000.0 + self.deadline_margin_s
        return Call("POST", path, model, timeout_s, idempotent=True, json=body)

    def append_events(self, user_id: UserIdLike, events: Iterable[EventLike]) -> Call[EventsResponse]:
        body = {"user_id": wire_user_id(user_id), "events": [wire_event(e) for e in events]}
        return Call("POST", "/v1/events", EventsResponse, self.timeout_s, idempotent=False, json=body)

    def set_profile(self, user_id: UserIdLike, profile: Mapping[str, str]) -> Call[ProfileResponse]:
        return Call("PUT", user_path(user_id, "profile"), ProfileResponse, self.timeout_s, idempotent=True,
                    json={"profile": dict(profile)})

    def history(self, user_id: UserIdLike, limit: int | None, cursor: str | None) -> Call[HistoryResponse]:
        params: dict[str, str | int] = {}
        if limit is not None:
            params["limit"] = _as_int(limit, "limit")
        if cursor is not None:
            params["cursor"] = cursor
        return Call("GET", user_path(user_id, "history"), HistoryResponse, self.timeout_s, idempotent=True,
                    params=params or None)
