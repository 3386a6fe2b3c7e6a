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

from service.config import BackgroundSettings
from service.engine.base import ForwardInterrupted
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
    work: Work
    predicted_ms: float
    deadline: float | None = None  # time.perf_counter() instant after which nobody reads the answer
    future: Future = field(default_factory=Future)
    key: Hashable | None = None
    queued_at: float = field(default_factory=time.monotonic)


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
        self._running: _Job | None = None
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
        job = _Job(work, predicted_ms, deadline)
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
        with self._cv:
            if self._closed or key in self._background or (self._running is not None and self._running.key == key):
                return False
            self._background[key] = _Job(work, predicted_ms, key=key)
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
        if self._running is not None and self._running_request:
            elapsed = (time.monotonic() - self._running_since) * 1000.0
            total += max(self._running.predicted_ms - elapsed, 0.0)
        return total

    def _report(self) -> None:
        self.telemetry.measure(Quantity.ENGINE_QUEUE_REQUESTS, len(self._requests) + int(self._running_request))
        self.telemetry.measure(Quantity.BACKGROUND_QUEUE_JOBS, len(self._background))
        self.telemetry.measure(Quantity.ENGINE_QUEUE_MS, self._backlog_locked())

    # -- the engine thread ------------------------------------------------------------------

    def _next(self) -> tuple[_Job, bool] | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                while self._requests:
                    job = self._requests.popleft()
                    if job.future.set_running_or_notify_cancel():  # False: its caller gave up waiting
                        self._start(job, request=True)
                        return job, True
                now = time.monotonic()
                while self._background:
                    _, job = self._background.popitem(last=False)
                    if now - job.queued_at > self.settings.background_max_age_s:
                        self.telemetry.count(BackgroundOutcome.EXPIRED)
                        continue
                    self._start(job, request=False)
                    return job, False
                self._report()
                self._cv.wait()

    def _start(self, job: _Job, *, request: bool) -> None:
        self._running, self._running_since, self._running_request = job, time.monotonic(), request
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
            job, request = picked
            try:
                if request:
                    self._run_request(job)
                else:
                    self._run_background(job)
            finally:
                with self._cv:
                    self._running, self._running_request = None, False
                    self._report()

    def _run_request(self, job: _Job) -> None:
        if job.deadline is not None and time.perf_counter() > job.deadline:
            self.telemetry.count(RequestWorkOutcome.EXPIRED)
            job.future.set_exception(TimeoutError("the request deadline passed while waiting for the engine"))
            return
        try:
            job.future.set_result(job.work(lambda: False))
        except TimeoutError as exc:  # the engine stopped at the request's deadline
            self.telemetry.count(RequestWorkOutcome.ABANDONED)
            job.future.set_exception(exc)
        except BaseException as exc:
            job.future.set_exception(exc)

    def _run_background(self, job: _Job) -> None:
        try:
            job.work(self._waiting)
        except ForwardInterrupted:  # a request arrived: try again once the engine is free
            with self._cv:
                if job.key not in self._background and len(self._background) < self.settings.background_max_jobs:
                    self._background[job.key] = job
                    self._background.move_to_end(job.key, last=False)
                else:
                    self.telemetry.count(BackgroundOutcome.DROPPED)
            return
        except Exception:
            log.warning("background engine job failed", exc_info=True)
            self.telemetry.count(BackgroundOutcome.FAILED)
            return
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
