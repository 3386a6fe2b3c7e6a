"""BurstLog: one line per burst of the same failure, with the count of what it held back."""

from __future__ import annotations

import logging
import time

from service.logging import BurstLog


def test_repeats_within_the_interval_are_counted_and_reported_once(caplog):
    logger = logging.getLogger("test.burst")
    burst = BurstLog(logger, interval_s=0.2)
    with caplog.at_level(logging.ERROR, logger="test.burst"):
        assert burst.log(logging.ERROR, "engine", "engine failed", exc_info=False)
        assert not any(burst.log(logging.ERROR, "engine", "engine failed") for _ in range(99))
        assert burst.log(logging.ERROR, "redis", "redis failed")  # another failure has its own burst
        time.sleep(0.25)
        assert burst.log(logging.ERROR, "engine", "engine failed")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["engine failed", "redis failed",
                        "engine failed (99 more since the last report, not logged)"]
    assert [getattr(r, "suppressed") for r in caplog.records] == [0, 0, 99]
