"""The gateway's threads beside the embedded engine's: which of them gets the CPUs first.

The engine's forward runs on its own thread and that thread's OpenMP workers, on the same CPUs as
the event loop, the CRM and the text side. Under a burst of requests that cannot wait for the
engine, their CRM answers come back at once and their callers return at once, and that work
(mostly the event loop's) can take every CPU, slowing the forward in flight past its deadline.
Linux schedules threads by their own nice values, so the threads other than the engine's take a
higher one: their work then fills the engine's idle time.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def lower_thread_priority(increment: int) -> int:
    """Raise the calling thread's nice value by ``increment`` (at most 19), so that where the CPUs
    are short the engine's threads, left as they were, get them first; threads the caller starts
    later inherit the value. Linux only: elsewhere the call would renice the whole process, engine
    included, so it does nothing. Returns the thread's nice value afterwards (0 where unchanged
    or unknown)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return 0
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as exc:  # a sandbox may forbid it: serve on at the same priority
        log.warning("could not lower the gateway threads' priority: %s", exc)
        return 0
