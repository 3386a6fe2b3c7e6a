"""One engine, two kinds of work: requests that wait for an answer, and background jobs that fill
caches for later requests (LLM scores of candidates a request could not wait for; the same queue
serves any other work that needs the engine beside requests).

The engine runs one forward at a time on one thread. Requests go first, in arrival order;
background jobs run only when no request waits, yield the engine between layers as soon as one
arrives (``ForwardInterrupted``, then they are queued again), are de-duplicated by key, bounded
in number and age, and the oldest are dropped first when the queue is full. ``backlog_ms`` is the
predicted time of the request work queued or running, which admission adds to a request's own
forward before it decides to wait for the engine.

Hand-written rather than a ThreadPoolExecutor: an executor has no priorities, cannot tell how
much work it holds, and cannot drop or interrupt what it queued.

Work that is an ``EngineCall`` (``submit_call``, ``submit_background_call``) can share a forward:
where the engine mixes each user's adapter in its forward (``mixes_in_forward``), the engine
thread takes the next request and every request waiting behind it of the same version, up to
``engine_pack_tokens`` prompt tokens, into one ``score_many``; with no request waiting, background
calls the same way. Requests and background work never share a forward, so a request never waits
for background rows; each call keeps its own deadline (a late one leaves the forward, the others
finish).

``intra_op_threads`` is the engine thread's own torch intra-op thread count, set on that thread
when it starts. torch's count is per thread: ``torch.set_num_threads`` sets the calling thread's,
and the count that threads started later begin with, which the scheduler leaves as its caller had
it. The gateway computes with several threads on the engine's thread alone (see
``service.api.wiring.build_pipeline``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

import numpy as np

from service.config import BackgroundSettings
from service.engine.base import EngineCall, ForwardInterrupted, ScoringEngine
from service.telemetry import NO_TELEMETRY, Quantity, Telemetry

log = logging.getLogger(__name__)

# A job's work: called on the engine thread with ``interrupted``, a callable that turns true when
# a request is waiting (background jobs pass it to the engine; requests ignore it).
Work = Callable[[Callable[[], bool]], Any]


class RequestWorkOutcome(StrEnum):
    """Request work the engine did not finish in time."""

    ABANDONED = "abandoned"  # a request's forward started, then stopped at its deadline
    EXPIRED = "expired"  # a request's work reached the engine after its deadline (not started)


class BackgroundOutcome(StrEnum):
    """How a background job ended."""

    SCORED = "scored"
    FAILED = "failed"
    DROPPED = "dropped"  # the queue was full (the oldest go first) or its key was cancelled
    EXPIRED = "expired"  # older than the age limit when the engine was free


def set_thread_intra_op_threads(threads: int) -> None:
    """The calling thread's torch intra-op thread count. torch gives a thread the count that new
    threads begin with on its first op or query, and that would replace a count set before it,
    so the count is queried first."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


@dataclass
class _Job:
    work: Work | None  # None: an engine call (``call``), which may share a forward with others
    predicted_ms: float
    deadline: float | None = None  # time.perf_counter() instant after which nobody reads the answer
    future: Future = field(default_factory=Future)
    key: Hashable | None = None
    queued_at: float = field(default_factory=time.monotonic)
    call: EngineCall | None = None
    engine: ScoringEngine | None = None  # what the call runs on
    on_scores: Callable[[np.ndarray], None] | None = None  # a background call's result goes here

    @property
    def tokens(self) -> int:
        call = self.call
        return 0 if call is None else len(call.prefix) + sum(len(s) for s in call.suffixes)

    @property
    def banks(self) -> str | None:
        return None if self.call is None else self.call.banks_key


class EngineScheduler:
    def __init__(self, settings: BackgroundSettings | None = None, *, telemetry: Telemetry = NO_TELEMETRY,
                 intra_op_threads: int | None = None) -> None:
        """``intra_op_threads``: torch intra-op threads on the engine's thread (None: torch's count
        for a new thread)."""
        self.settings = settings or BackgroundSettings()
        self.telemetry = telemetry
        self.intra_op_threads = intra_op_threads
        self._cv = threading.Condition()
        self._requests: deque[_Job] = deque()
        self._background: OrderedDict[Hashable, _Job] = OrderedDict()
        self._running: list[_Job] = []  # the work on the engine now (several calls when packed)
        self._running_since = 0.0
        self._running_request = False
        self._closed = False
        caller_threads = torch.get_num_threads() if intra_op_threads is not None else None
        started = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(started,), name="engine", daemon=True)
        self._thread.start()
        started.wait()
        if caller_threads is not None:
            # Setting the engine thread's count also set the count that threads started later
            # begin with: back to the caller's (which leaves the caller's own as it was).
            torch.set_num_threads(caller_threads)

    # -- submitting -------------------------------------------------------------------------

    def submit(self, work: Work, predicted_ms: float, deadline: float | None = None) -> Future:
        """Queue a request's work ahead of every background job; its future carries the result.
        Work that reaches the engine after ``deadline`` is not started (TimeoutError)."""
        return self._queue_request(_Job(work, predicted_ms, deadline))

    def submit_call(self, engine: ScoringEngine, call: EngineCall, predicted_ms: float) -> Future:
        """Queue a request's engine call (its deadline is the call's); the future carries P(Yes) per
        suffix. Calls may share a forward with other users' requests."""
        return self._queue_request(_Job(None, predicted_ms, call.deadline, call=call, engine=engine))

    def _queue_request(self, job: _Job) -> Future:
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine scheduler is closed")
            self._requests.append(job)
            self._report()
            self._cv.notify()
        return job.future

    def submit_background(self, key: Hashable, work: Work, predicted_ms: float) -> bool:
        """Queue background work unless work under ``key`` is queued or running already; when the
        queue is full the oldest job is dropped. Returns whether it was queued."""
        return self._queue_background(_Job(work, predicted_ms, key=key))

    def submit_background_call(self, key: Hashable, engine: ScoringEngine, call: EngineCall,
                               on_scores: Callable[[np.ndarray], None], predicted_ms: float) -> bool:
        """``submit_background`` for an engine call: ``on_scores`` gets its P(Yes) on the engine
        thread. Background calls may share a forward with each other, never with requests."""
        return self._queue_background(_Job(None, predicted_ms, key=key, call=call, engine=engine,
                                           on_scores=on_scores))

    def _queue_background(self, job: _Job) -> bool:
        key = job.key
        with self._cv:
            if self._closed or key in self._background or any(r.key == key for r in self._running):
                return False
            self._background[key] = job
            while len(self._background) > self.settings.background_max_jobs:
                self._background.popitem(last=False)
                self.telemetry.count(BackgroundOutcome.DROPPED)
            self._report()
            self._cv.notify()
        return True

    # -- what admission reads -------------------------------------------------------------------

    def backlog_ms(self) -> float:
        """Predicted milliseconds of request work ahead of a request submitted now: every queued
        request, and what remains of the running one. Background work counts nothing: it yields
        at the next layer."""
        with self._cv:
            return self._backlog_locked()

    def depth(self) -> tuple[int, int]:
        """(requests waiting or running, background jobs queued)."""
        with self._cv:
            return len(self._requests) + int(self._running_request), len(self._background)

    def _backlog_locked(self) -> float:
        total = sum(job.predicted_ms for job in self._requests if not job.future.cancelled())
        if self._running and self._running_request:
            elapsed = (time.monotonic() - self._running_since) * 1000.0
            total += max(sum(job.predicted_ms for job in self._running) - elapsed, 0.0)
        return total

    def _report(self) -> None:
        self.telemetry.measure(Quantity.ENGINE_QUEUE_REQUESTS, len(self._requests) + int(self._running_request))
        self.telemetry.measure(Quantity.BACKGROUND_QUEUE_JOBS, len(self._background))
        self.telemetry.measure(Quantity.ENGINE_QUEUE_MS, self._backlog_locked())

    # -- the engine thread ------------------------------------------------------------------

    def _next(self) -> tuple[list[_Job], bool] | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                while self._requests:
                    job = self._requests.popleft()
                    if job.future.set_running_or_notify_cancel():  # False: its caller gave up waiting
                        group = [job] + self._pack(job, self._take_request)
                        self._start(group, request=True)
                        return group, True
                while self._background:
                    job = self._take_background(lambda _: True)
                    if job is not None:
                        group = [job] + self._pack(job, self._take_background)
                        self._start(group, request=False)
                        return group, False
                self._report()
                self._cv.wait()

    def _pack(self, lead: _Job, take: Callable[[Callable[[_Job], bool]], _Job | None]) -> list[_Job]:
        """The calls that share ``lead``'s forward: of the same banks, within the token budget."""
        budget = self.settings.engine_pack_tokens
        if lead.banks is None or budget <= 0 or not getattr(lead.engine, "mixes_in_forward", False):
            return []
        tokens, more = lead.tokens, []
        while True:
            job = take(lambda j: j.engine is lead.engine and j.banks == lead.banks and tokens + j.tokens <= budget)
            if job is None:
                return more
            tokens += job.tokens
            more.append(job)

    def _take_request(self, fits: Callable[[_Job], bool]) -> _Job | None:
        """The first waiting request that ``fits`` (its caller still waiting), taken off the queue."""
        for job in list(self._requests):
            if job.future.cancelled():
                self._requests.remove(job)
            elif fits(job):
                self._requests.remove(job)
                if job.future.set_running_or_notify_cancel():
                    return job
        return None

    def _take_background(self, fits: Callable[[_Job], bool]) -> _Job | None:
        """The oldest queued background job that ``fits``, dropping the expired ones it passes."""
        now = time.monotonic()
        for key, job in list(self._background.items()):
            if now - job.queued_at > self.settings.background_max_age_s:
                del self._background[key]
                self.telemetry.count(BackgroundOutcome.EXPIRED)
            elif fits(job):
                del self._background[key]
                return job
        return None

    def _start(self, group: list[_Job], *, request: bool) -> None:
        self._running, self._running_since, self._running_request = group, time.monotonic(), request
        self._report()

    def _waiting(self) -> bool:
        return bool(self._requests)  # read without the lock: a stale answer costs one layer

    def _loop(self, started: threading.Event) -> None:
        if self.intra_op_threads is not None:
            set_thread_intra_op_threads(self.intra_op_threads)
        started.set()
        while True:
            picked = self._next()
            if picked is None:
                return
            group, request = picked
            try:
                if request:
                    self._run_requests(group)
                else:
                    self._run_background(group)
            finally:
                with self._cv:
                    self._running, self._running_request = [], False
                    self._report()

    def _results(self, group: list[_Job], interrupted: Callable[[], bool]) -> list[Any]:
        """Each job's result or the exception that ended it: one ``score_many`` for a group of calls."""
        if group[0].work is not None:
            try:
                return [group[0].work(interrupted)]
            except BaseException as exc:
                return [exc]
        calls, engine = [job.call for job in group], group[0].engine
        try:
            if len(calls) > 1:
                return engine.score_many(calls, interrupted)
            call = calls[0]
            yields = None if group[0].on_scores is None else interrupted  # a request's never yields
            return [engine.score(call.adapter, call.prefix, call.suffixes, call.deadline, yields, embeds=call.embeds)]
        except BaseException as exc:
            return [exc] * len(calls)

    def _run_requests(self, group: list[_Job]) -> None:
        now = time.perf_counter()
        live = []
        for job in group:
            if job.deadline is not None and now > job.deadline:
                self.telemetry.count(RequestWorkOutcome.EXPIRED)
                job.future.set_exception(TimeoutError("the request deadline passed while waiting for the engine"))
            else:
                live.append(job)
        if not live:
            return
        for job, result in zip(live, self._results(live, lambda: False)):
            if isinstance(result, TimeoutError):  # the engine stopped at the request's deadline
                self.telemetry.count(RequestWorkOutcome.ABANDONED)
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _run_background(self, group: list[_Job]) -> None:
        for job, result in zip(group, self._results(group, self._waiting)):
            if isinstance(result, ForwardInterrupted):  # a request arrived: try again once the engine is free
                with self._cv:
                    if job.key not in self._background and len(self._background) < self.settings.background_max_jobs:
                        self._background[job.key] = job
                        self._background.move_to_end(job.key, last=False)
                    else:
                        self.telemetry.count(BackgroundOutcome.DROPPED)
                continue
            if isinstance(result, BaseException):
                log.warning("background engine job failed", exc_info=result)
                self.telemetry.count(BackgroundOutcome.FAILED)
                continue
            if job.on_scores is not None:
                try:
                    job.on_scores(result)
                except Exception:
                    log.warning("background engine job failed", exc_info=True)
                    self.telemetry.count(BackgroundOutcome.FAILED)
                    continue
            self.telemetry.count(BackgroundOutcome.SCORED)

    def close(self) -> None:
        """Stop taking work; queued requests fail, queued background work is dropped."""
        with self._cv:
            self._closed = True
            for job in self._requests:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(RuntimeError("the engine scheduler closed"))
            self._requests.clear()
            self._background.clear()
            self._cv.notify_all()
