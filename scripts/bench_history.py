"""Per-request cost of the history store: ``HistoryStore.read`` latency and its decode share.

Loads USERS synthetic users with EVENTS behaviours each under a throwaway key prefix, reads them
back (sequentially for latency, then CONCURRENCY at a time for throughput), prints p50/p99 and
deletes its keys. Reply parsing dominates read() for long histories: the figures differ by about
10x with and without the hiredis parser, so the first line says which one ran. With
``--knowledge-dim D`` every user also has a D-float knowledge vector record, which read() fetches in
the same round trip. Usage: .venv/bin/python scripts/bench_history.py [--redis-url URL] [--users N]
[--knowledge-dim 384]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from redis.utils import HIREDIS_AVAILABLE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.history import (HistorySettings, HistoryStore, KnowledgeRecord, bulk_load,  # noqa: E402
                             bulk_load_knowledge, decode_records, events_key)
from service.history.clients import sync_client  # noqa: E402


def percentiles(samples_s: list[float]) -> str:
    ms = np.asarray(samples_s) * 1000.0
    return f"p50 {np.percentile(ms, 50):7.3f} ms   p99 {np.percentile(ms, 99):7.3f} ms   mean {ms.mean():7.3f} ms"


def synthetic_rows(users: int, events: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for u in range(users):
        stamps = np.sort(rng.integers(946_684_800, 1_700_000_000, events))
        yield (f"bench{u}", rng.integers(1, 50_000, events), rng.integers(1, 6, events).astype(np.float32), stamps,
               {"age": "25-34", "gender": "F", "occupation": "engineer"})


async def bench_reads(store_settings: HistorySettings, prefix: str, users: int, events: int, rounds: int, concurrency: int,
                      with_knowledge: bool = False) -> None:
    store = HistoryStore.from_settings(store_settings.model_copy(update=dict(redis_prefix=prefix, history_max_events=events)))
    ids = [f"bench{u}" for u in range(users)]
    try:
        for user in ids[:20]:  # warm the connection and the script cache
            await store.read(user)
        latencies = []
        for _ in range(rounds):
            for user in ids:
                t = time.perf_counter()
                history = await store.read(user)
                latencies.append(time.perf_counter() - t)
                assert len(history.items) == events and (history.knowledge is not None) == with_knowledge
        print(f"read() sequential, {len(latencies)} reads:   {percentiles(latencies)}")

        gate = asyncio.Semaphore(concurrency)

        async def one(user: str) -> float:
            async with gate:
                t = time.perf_counter()
                await store.read(user)
                return time.perf_counter() - t

        start = time.perf_counter()
        timed = await asyncio.gather(*(one(u) for _ in range(rounds) for u in ids))
        wall = time.perf_counter() - start
        print(f"read() {concurrency} concurrent, {len(timed)} reads: {percentiles(timed)}   "
              f"{len(timed) / wall:,.0f} reads/s (one event loop)")
    finally:
        await store.aclose()


def bench_decode(store_settings: HistorySettings, prefix: str, users: int, events: int, rounds: int) -> None:
    client = sync_client(store_settings)
    replies = [client.lrange(events_key(prefix, f"bench{u}"), 0, -1) for u in range(users)]
    client.close()
    cost = []
    for _ in range(rounds):
        for records in replies:
            t = time.perf_counter()
            decode_records(records)
            cost.append(time.perf_counter() - t)
    payload = sum(len(r) for r in replies[0])
    print(f"decode of {events} records ({payload / 1024:.1f} KiB), {len(cost)} runs: {percentiles(cost)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-cluster", action="store_true", help="--redis-url names a seed node of a cluster")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--knowledge-dim", type=int, default=0, help="store a knowledge vector of this size per "
                        "user (0: none)")
    args = parser.parse_args()
    prefix = f"bench:{uuid.uuid4().hex}:"
    store_settings = HistorySettings(redis_url=args.redis_url, redis_cluster=args.redis_cluster)
    print(f"reply parser: {'hiredis' if HIREDIS_AVAILABLE else 'pure Python (install hiredis for ~10x faster reads)'}")
    try:
        t = time.perf_counter()
        counts = bulk_load(store_settings, synthetic_rows(args.users, args.events), prefix=prefix,
                           max_events=args.events, progress=False)
        print(f"bulk_load {counts['users']} users x {args.events} events: {time.perf_counter() - t:.2f} s")
        if args.knowledge_dim:
            rng = np.random.default_rng(1)
            bulk_load_knowledge(store_settings, ((f"bench{u}", KnowledgeRecord(
                rng.normal(size=args.knowledge_dim).astype(np.float32), "bench-encoder", args.events, time.time()))
                for u in range(args.users)), prefix=prefix, progress=False)
            print(f"knowledge vectors of {args.knowledge_dim} floats stored for every user")
        asyncio.run(bench_reads(store_settings, prefix, args.users, args.events, args.rounds, args.concurrency,
                                with_knowledge=bool(args.knowledge_dim)))
        bench_decode(store_settings, prefix, args.users, args.events, args.rounds)
    finally:
        client = sync_client(store_settings)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):  # one by one: keys of many slots
            client.delete(key)
        client.close()


if __name__ == "__main__":
    main()
