"""Nearline refresh of users' knowledge vectors: a background job once enough new events arrived.

Every append answers the user's event count and the stamp of their stored knowledge record
(``HistoryStore.append_counted``, no extra round trip), so the events route decides here, for
free, whether the vector is due: when ``knowledge_refresh_events`` events were appended since it
was generated, or since none usable by the serving version exists. A due user gets ONE background job on the
engine scheduler (keyed ``("knowledge", user)``, so repeats while it waits are dropped): on the
engine thread it reads the user's stored history, profile and event count in one transaction
and generates the preference text with the base LLM, yielding to requests between decode steps
(``ForwardInterrupted``: the scheduler queues it again and it starts over); on the refresher's
own thread the text is encoded and the record written with events-at = the count it was
generated from. Until then the previous vector serves.

The LLM side (prompt, generation, encoder) comes in as a ``KnowledgeSource``; a gateway without
a base LLM has none, and a due refresh is then counted as unavailable (and logged once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from service.config import KnowledgeRefreshSettings
from service.history import AppendResult, HistoryStore, KnowledgeRecord, KnowledgeStamp, UserHistory
from service.logging import BurstLog
from service.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)
burst = BurstLog(log)


class RefreshOutcome(StrEnum):
    REFRESHED = "refreshed"  # a new record was written
    FAILED = "failed"  # reading, generating, encoding or writing failed
    UNAVAILABLE = "unavailable"  # due, but this gateway has no base LLM to generate with
    SUPERSEDED = "superseded"  # written meanwhile from more events, or the user was forgotten: nothing written


@dataclass(frozen=True)
class KnowledgeTarget:
    """The encoder (and its dimension) whose vectors the serving version reads."""

    encoder: str
    dim: int

    def made(self, stamp: KnowledgeStamp | None) -> bool:
        return stamp is not None and (stamp.encoder, stamp.dim) == (self.encoder, self.dim)


class KnowledgeSource(Protocol):
    """The LLM side of a refresh."""

    def target(self) -> KnowledgeTarget | None:
        """The serving version's encoder; None when it has no knowledge (nothing to refresh)."""
        ...

    def generate(self, history: UserHistory, interrupted: Callable[[], bool]) -> str:
        """The preference text of the stored user (the engine thread); ``ForwardInterrupted`` when
        ``interrupted()`` turns true."""
        ...

    def encode(self, text: str, target: KnowledgeTarget) -> np.ndarray:
        """The text's (dim,) float32 vector by ``target``'s encoder (the refresher's thread)."""
        ...


# submit_background(key, work, predicted_ms) -> queued? (EngineScheduler.submit_background)
Submit = Callable[[Hashable, Callable[[Callable[[], bool]], Any], float], bool]


class KnowledgeRefresher:
    """Decides on every append whether the user's vector is due, and runs the refresh job."""

    def __init__(self, store: HistoryStore, settings: KnowledgeRefreshSettings, *,
                 target: Callable[[], KnowledgeTarget | None], source: KnowledgeSource | None, submit: Submit | None,
                 telemetry: Telemetry = NO_TELEMETRY, retried: tuple[type[BaseException], ...] = (),
                 io_timeout_s: float = 5.0) -> None:
        """``retried``: what a job raises when it yields the engine and is queued again (not a failure)."""
        self.store, self.settings, self.target, self.source, self.submit = store, settings, target, source, submit
        self.retried = retried
        self.telemetry = telemetry
        self.io_timeout_s = io_timeout_s
        self._warned = False
        # Encoding and the write off the engine thread: the encoder loads there on first use, and
        # neither keeps a request waiting for the engine.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowledge")

    def due(self, count: int, stamp: KnowledgeStamp | None, target: KnowledgeTarget | None) -> bool:
        """Whether the vector of a user with ``count`` events and a record stamped ``stamp`` needs
        regenerating: ``knowledge_refresh_events`` events since the one the version can read was
        generated (since none, when it cannot read one)."""
        every = self.settings.knowledge_refresh_events
        if every == 0 or target is None:
            return False
        since = stamp.events_at if target.made(stamp) else 0
        return count - since >= every

    def observe(self, user_id: str, appended: AppendResult) -> bool:
        """Events were appended for the user (on the event loop): queue a refresh when due.
        Returns whether a job was queued."""
        if not self.due(appended.count, appended.knowledge, self.target()):
            return False
        if self.source is None or self.submit is None:
            self.telemetry.count(RefreshOutcome.UNAVAILABLE)
            if not self._warned:
                self._warned = True
                log.warning("knowledge vectors are due for a refresh but this gateway has no base LLM to generate "
                            "them with (a CRM-only bundle or the remote engine); the stored vectors keep serving")
            return False
        work = self._work(user_id, asyncio.get_running_loop())
        return self.submit(("knowledge", user_id), work, 0.0)

    def _work(self, user_id: str, loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[], bool]], None]:
        source = self.source

        def work(interrupted: Callable[[], bool]) -> None:  # on the engine thread
            target = self.target()
            if target is None:  # the serving version has no knowledge any more
                return
            try:
                history, count = self._on_loop(self.store.read_with_count(user_id), loop)
                stored = history.knowledge
                if not self.due(count, None if stored is None else stored.stamp, target):
                    return  # refreshed meanwhile (by another gateway)
                text = source.generate(history, interrupted)
            except self.retried:
                raise
            except Exception:
                self.telemetry.count(RefreshOutcome.FAILED)
                raise
            self._pool.submit(self._finish, user_id, text, target, count, loop)

        return work

    def _finish(self, user_id: str, text: str, target: KnowledgeTarget, count: int,
                loop: asyncio.AbstractEventLoop) -> None:
        """Encode and write (the refresher's thread)."""
        try:
            vector = np.asarray(self.source.encode(text, target), dtype=np.float32).reshape(-1)
            if vector.size != target.dim:
                raise ValueError(f"encoder {target.encoder} gave a {vector.size}-d vector, the version reads "
                                 f"{target.dim}-d")
            record = KnowledgeRecord(vector, target.encoder, count, time.time())
            written = self._on_loop(self.store.put_knowledge(user_id, record), loop)
        except Exception as exc:
            burst.log(logging.WARNING, f"knowledge:{type(exc).__name__}", "knowledge refresh failed",
                      error=repr(exc), exc_info=True)
            self.telemetry.count(RefreshOutcome.FAILED)
            return
        self.telemetry.count(RefreshOutcome.REFRESHED if written else RefreshOutcome.SUPERSEDED)

    def _on_loop(self, coro, loop: asyncio.AbstractEventLoop):
        """Run a store coroutine on the app's event loop (whose connection pool it uses) and wait."""
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(self.io_timeout_s)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
