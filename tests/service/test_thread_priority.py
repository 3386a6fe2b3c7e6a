"""The gateway's threads beside the engine's: a thread lowers its own priority, no other thread's."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from service.thread_priority import lower_thread_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def nice_of(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


def on_a_thread(fn):
    """``fn()``'s result, run on a thread of its own (whose nice value dies with it)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(10)
    return out[0]


def test_only_the_calling_thread_and_the_threads_it_starts_later_are_lowered() -> None:
    here = nice_of(threading.get_native_id())

    def lowered() -> tuple[int, int, int]:
        before = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
        before.start()  # started before the call: keeps its value
        after = lower_thread_priority(3)
        child = on_a_thread(lambda: nice_of(threading.get_native_id()))
        return after, child, nice_of(before.native_id)

    after, child, sibling = on_a_thread(lowered)
    assert after == min(19, here + 3) and child == after and sibling == here
    assert nice_of(threading.get_native_id()) == here  # the test's own thread is untouched


def test_nothing_changes_without_an_increment_and_the_value_stops_at_19() -> None:
    here = nice_of(threading.get_native_id())
    assert on_a_thread(lambda: (lower_thread_priority(0), nice_of(threading.get_native_id()))) == (0, here)
    assert on_a_thread(lambda: lower_thread_priority(25)) == 19
