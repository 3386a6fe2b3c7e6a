"""Background asyncio loops that stop when asked, and a shutdown that never waits on one forever.

redis-py's asyncio client can lose a ``CancelledError`` that lands while a pipeline runs or
releases its connection (a long-standing class of its bugs: redis/redis-py#2028, #2551): the
cancelled call returns or raises a Redis error instead, and a loop that catches Redis errors
goes on as if never asked to stop. So a background loop checks, every turn, whether its task was
asked to stop (``Task.cancelling()``) rather than trusting the exception to reach it, and a
shutdown waits for its loops within a bound and names any that outlive it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` when the running task was asked to stop, even if the request was lost on the way."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


async def stop_tasks(tasks: Iterable[asyncio.Task], timeout_s: float = 5.0) -> list[str]:
    """Cancel ``tasks`` and wait up to ``timeout_s`` for them; returns (and logs) the names of those still
    running, which the caller leaves behind rather than hang its shutdown."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return []
    _, left = await asyncio.wait(pending, timeout=timeout_s)
    names = sorted(t.get_name() for t in left)
    if names:
        log.warning("background tasks did not stop within %.1f s; shutting down without them", timeout_s,
                    extra={"tasks": names})
    return names


__all__ = ["raise_if_cancelled", "stop_tasks"]
