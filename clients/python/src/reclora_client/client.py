"""The sync and async clients: the same calls, carried out by ``httpx.Client`` or ``httpx.AsyncClient``.

Each method builds its call and runs ``_core.exchange``; the two classes differ only in how a
step is carried out (blocking or awaited), so request building, answer parsing and the retry
policy exist once, in ``_core``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack, cast

import httpx

from reclora_client import __version__
from reclora_client._core import Call, Calls, EventLike, M, RetryPolicy, Sleep, UserIdLike, exchange
from reclora_client.models import EventsResponse, ExplainResponse, HistoryResponse, ProfileResponse, ScoreResponse


class ClientOptions(TypedDict, total=False):
    """The options both clients take besides ``base_url`` and ``transport`` (defaults in ``_Base``)."""

    timeout_s: float
    default_deadline_ms: int | None
    deadline_margin_s: float
    retries: int
    backoff_s: float
    max_backoff_s: float
    retry_budget_s: float
    headers: Mapping[str, str] | None


class _Base:
    def __init__(self, base_url: str, *, timeout_s: float = 5.0, default_deadline_ms: int | None = 500,
                 deadline_margin_s: float = 0.5, retries: int = 2, backoff_s: float = 0.2,
                 max_backoff_s: float = 2.0, retry_budget_s: float = 10.0,
                 headers: Mapping[str, str] | None = None) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL with a host, not {base_url!r}")
        if timeout_s <= 0 or deadline_margin_s < 0:
            raise ValueError("timeout_s must be > 0 and deadline_margin_s >= 0")
        self._calls = Calls(timeout_s, default_deadline_ms, deadline_margin_s)
        self._policy = RetryPolicy(retries, backoff_s, max_backoff_s, retry_budget_s)
        self._rng = random.Random()
        self._http_options: dict[str, Any] = {
            "base_url": url, "timeout": timeout_s, "follow_redirects": False,
            "headers": {"User-Agent": f"reclora-client/{__version__}", **(headers or {})}}


class RecLoRAClient(_Base):
    """Blocking client of the RecLoRA gateway; use as a context manager (or call ``close``).

    ``timeout_s`` bounds one try of the calls other than ``score``, whose tries take their
    deadline (``deadline_ms``, else ``default_deadline_ms``; None sends none, so the gateway's
    default applies and ``timeout_s`` bounds the try) plus ``deadline_margin_s`` for the network.
    Failed tries are retried up to ``retries`` times within ``retry_budget_s`` seconds of the first
    (see ``should_retry`` in ``_core`` for which failures). ``transport`` replaces httpx's
    network transport (a proxy mount, a Unix socket); ``headers`` go with every request.
    """

    def __init__(self, base_url: str, *, transport: httpx.BaseTransport | None = None,
                 **options: Unpack[ClientOptions]) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(transport=transport, **self._http_options)

    def score(self, user_id: UserIdLike, candidates: Iterable[int], *, deadline_ms: int | None = None) -> ScoreResponse:
        """Scores of ``candidates`` (raw item ids, distinct) for ``user_id``, in request order."""
        return self._run(self._calls.score(user_id, candidates, deadline_ms))

    def explain(self, user_id: UserIdLike, candidates: Iterable[int], *,
                deadline_ms: int | None = None) -> ExplainResponse:
        """Each candidate's score taken apart (``POST /v1/explain``, when the gateway enables it):
        CRM, LLM (computed on demand), fusion, what is served, the history each prompt read, the
        user's gate mixture. ``deadline_ms`` None: the gateway's explain deadline. Pass the admin
        token in ``headers`` where the gateway's admin API is on."""
        return self._run(self._calls.explain(user_id, candidates, deadline_ms))

    def append_events(self, user_id: UserIdLike, events: Iterable[EventLike]) -> EventsResponse:
        """Append behaviours, oldest first: ``Event``s or ``(item_id, rating, unix_seconds)`` tuples.

        Not retried after a timeout (``TimedOut``): the gateway may have stored the batch, and
        sending it again could store it twice; read ``history`` before re-sending."""
        return self._run(self._calls.append_events(user_id, events))

    def set_profile(self, user_id: UserIdLike, profile: Mapping[str, str]) -> ProfileResponse:
        """Replace the user's profile fields (``{}`` clears them)."""
        return self._run(self._calls.set_profile(user_id, profile))

    def history(self, user_id: UserIdLike, *, limit: int | None = None, cursor: str | None = None) -> HistoryResponse:
        """One page of the user's stored behaviours, newest first, and their profile; pass the
        answer's ``next_cursor`` as ``cursor`` for the next, older page."""
        return self._run(self._calls.history(user_id, limit, cursor))

    def _run(self, call: Call[M]) -> M:
        steps = exchange(call, self._policy, self._rng)
        outcome: httpx.Response | httpx.TransportError | None = None
        while True:
            try:
                step = steps.send(outcome)
            except StopIteration as done:
                return cast(M, done.value)  # the generator's return value: the parsed answer
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                outcome = None
                continue
            try:
                outcome = self._http.request(**step.request_args())
            except httpx.TransportError as exc:
                outcome = exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncRecLoRAClient(_Base):
    """The asyncio counterpart of ``RecLoRAClient``: the same options, calls and retries, awaited."""

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None,
                 **options: Unpack[ClientOptions]) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options)

    async def score(self, user_id: UserIdLike, candidates: Iterable[int], *,
                    deadline_ms: int | None = None) -> ScoreResponse:
        """See ``RecLoRAClient.score``."""
        return await self._run(self._calls.score(user_id, candidates, deadline_ms))

    async def explain(self, user_id: UserIdLike, candidates: Iterable[int], *,
                      deadline_ms: int | None = None) -> ExplainResponse:
        """See ``RecLoRAClient.explain``."""
        return await self._run(self._calls.explain(user_id, candidates, deadline_ms))

    async def append_events(self, user_id: UserIdLike, events: Iterable[EventLike]) -> EventsResponse:
        """See ``RecLoRAClient.append_events`` (not retried after a timeout)."""
        return await self._run(self._calls.append_events(user_id, events))

    async def set_profile(self, user_id: UserIdLike, profile: Mapping[str, str]) -> ProfileResponse:
        """See ``RecLoRAClient.set_profile``."""
        return await self._run(self._calls.set_profile(user_id, profile))

    async def history(self, user_id: UserIdLike, *, limit: int | None = None,
                      cursor: str | None = None) -> HistoryResponse:
        """See ``RecLoRAClient.history``."""
        return await self._run(self._calls.history(user_id, limit, cursor))

    async def _run(self, call: Call[M]) -> M:
        steps = exchange(call, self._policy, self._rng)
        outcome: httpx.Response | httpx.TransportError | None = None
        while True:
            try:
                step = steps.send(outcome)
            except StopIteration as done:
                return cast(M, done.value)  # the generator's return value: the parsed answer
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                outcome = None
                continue
            try:
                outcome = await self._http.request(**step.request_args())
            except httpx.TransportError as exc:
                outcome = exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
