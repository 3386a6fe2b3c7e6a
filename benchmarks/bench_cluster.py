"""The history store on one Redis node against a Redis Cluster (3 masters, 3 replicas), on the same
machine in one run: both started here on loopback ports, stopped by PID at the end.

Per store: ``HistoryStore.read`` p50/p99 for users of 1,000 events (sequential), appends per
second (one event per append, sequential and with 16 at once), and a gateway's ``POST /v1/score``
p50/p99 with a CRM-only bundle over ML-100K users' histories (20 random candidates, one caller).
Both servers run without persistence, so the figures compare routing, not disks.

    python benchmarks/bench_cluster.py --data work/ml-100k --store work/store --version crm-v1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_support import start_gateway, stop_gateway  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from service.history import Event, HistorySettings, HistoryStore, bulk_load  # noqa: E402
from tests.redis_support import RedisTarget, own_cluster, own_server  # noqa: E402  (the suite's own servers)

PREFIX = "bench-cluster:"


def quantiles(samples_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples_s) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def synthetic_users(n: int, events: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for u in range(n):
        stamps = np.sort(rng.integers(946_684_800, 1_600_000_000, events))
        yield (f"bench{u}", rng.integers(1, 50_000, events), rng.integers(1, 6, events).astype(np.float32), stamps,
               {"age": "25-34", "gender": "F"})


async def store_figures(settings: HistorySettings, users: int, reads: int, appends: int) -> dict[str, float]:
    bulk_load(settings, synthetic_users(users, 1000), prefix=PREFIX, max_events=1000, progress=False)
    store = HistoryStore.from_settings(settings)
    ids = [f"bench{u}" for u in range(users)]
    try:
        for user in ids[:20]:  # warm the pool, the slot map and the script cache
            await store.read(user)
        latencies = []
        for i in range(reads):
            t = time.perf_counter()
            history = await store.read(ids[i % users])
            latencies.append(time.perf_counter() - t)
            assert len(history.items) == 1000
        read_p50, read_p99 = quantiles(latencies)

        stamp = [1_700_000_000]

        def event() -> list[Event]:
            stamp[0] += 1
            return [Event(7, 4.0, stamp[0])]

        t = time.perf_counter()
        for i in range(appends):
            await store.append(ids[i % users], event())
        sequential = appends / (time.perf_counter() - t)
        async def worker(w: int) -> None:  # a user of its own each, so its appends stay in time order
            for _ in range(appends // 16):
                await store.append(f"bench-w{w}", event())

        t = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(16)))
        concurrent = 16 * (appends // 16) / (time.perf_counter() - t)
    finally:
        await store.aclose()
    return {"read_p50": read_p50, "read_p99": read_p99, "appends_seq": sequential, "appends_16": concurrent}


def gateway_figures(target: RedisTarget, data: Path, store: Path, version: str, port: int, requests: int,
                    log: Path) -> tuple[float, float]:
    from training.data.samples import PreparedData
    from training.history_loader import histories_from_prepared

    prepared = PreparedData.load(data)
    bulk_load(target.history(), histories_from_prepared(prepared), prefix=PREFIX, progress=False)
    users = [str(u) for u in prepared.users["user"].to_numpy()[:200]]
    items = prepared.items["item"].to_numpy()
    gateway = start_gateway(port, log, {"redis_url": target.url, "redis_cluster": str(target.cluster).lower(),
                                        "redis_prefix": PREFIX, "model_store": store, "active_version": version,
                                        "served_log": "false", "model_poll_s": "0"})
    rng = np.random.default_rng(0)
    latencies = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for i in range(requests + 20):
                body = {"user_id": users[i % len(users)], "candidates": [int(c) for c in rng.choice(items, 20, False)]}
                t = time.perf_counter()
                response = http.post("/v1/score", json=body)
                if i >= 20:  # the first ones warm the pools
                    latencies.append(time.perf_counter() - t)
                assert response.status_code == 200 and not response.json()["degraded"], response.text
    finally:
        stop_gateway(gateway)
    return quantiles(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset (reclora prepare)")
    parser.add_argument("--store", type=Path, required=True, help="a model store holding a CRM-only version")
    parser.add_argument("--version", required=True)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()
    print(f"hiredis parser: {'yes' if HIREDIS_AVAILABLE else 'no'}")
    rows = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    with own_server("redis-server", "--appendonly", "no") as url, own_cluster() as cluster:
        for target in (RedisTarget(url), cluster.target):
            figures = asyncio.run(store_figures(target.history(redis_prefix=PREFIX), args.users, args.reads,
                                                args.appends))
            figures["score_p50"], figures["score_p99"] = gateway_figures(
                target, args.data, args.store, args.version, args.port, args.requests, logs / f"{target.name}.log")
            rows[target.name] = figures
    print(f"{'store':8} {'read p50':>9} {'read p99':>9} {'appends/s':>10} {'appends/s x16':>14} "
          f"{'score p50':>10} {'score p99':>10}")
    for name, f in rows.items():
        print(f"{name:8} {f['read_p50']:7.2f}ms {f['read_p99']:7.2f}ms {f['appends_seq']:10.0f} {f['appends_16']:14.0f} "
              f"{f['score_p50']:8.2f}ms {f['score_p99']:8.2f}ms")
    single, cluster_row = rows["single"], rows["cluster"]
    print(f"cluster / single: read p50 {cluster_row['read_p50'] / single['read_p50']:.2f}x, "
          f"appends x16 {cluster_row['appends_16'] / single['appends_16']:.2f}x, "
          f"score p50 {cluster_row['score_p50'] / single['score_p50']:.2f}x")


if __name__ == "__main__":
    main()
