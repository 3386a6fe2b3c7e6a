"""Adapter cache hit rate with user-affinity routing versus random routing across vLLM replicas.

Simulates, with the gateway's real routers (``service.engine.vllm.routing``):

- Zipf-distributed traffic: ``--requests`` requests from ``--users`` users, P(rank k) ~ k^-s;
- ``N`` replicas (``--replicas``), each with an LRU cache of ``--cache`` adapters, as a vLLM server
  keeps with ``--max-cpu-loras``; a request whose adapter is not cached is a miss (a load from disk);
- crude concurrency: ``--in-flight`` requests stay acquired on their replica and are released in
  FIFO order, so the load bound of consistent hashing with bounded loads acts on hot users
  (one affinity row per ``--load-factors`` value).

Per N and router it prints the cache hit rate, the share of requests that left the user's home
replica because of the load bound (spill), the imbalance of requests served (max / mean per
replica), the peak in-flight count on any replica against the bound, and as a reference the hit
rate of a single LRU of N x C adapters (what perfect partitioning could reach).

With ``--prototypes P`` it compares, per user count of ``--user-counts``, exact per-user adapters
(affinity routing, the first load factor) with P prototype adapters (``service.llm.prototypes``:
every user maps to one of P, all P loaded on every replica at activation and pinned there, each
request to the least-loaded replica): adapter loads per 1,000 requests after the first half of
the traffic has warmed the caches (the activation's N x P preloads are not requests' loads), and
the load imbalance (requests served max / mean per replica; in flight, the peak).

Run: .venv/bin/python benchmarks/bench_routing.py   (add --help for the flags)
     .venv/bin/python benchmarks/bench_routing.py --prototypes 16 --zipf 0.8 --replicas 8
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.vllm.routing import AffinityRouter, RandomRouter, stable_hash  # noqa: E402


def zipf_traffic(users: int, requests: int, exponent: float, seed: int) -> list[str]:
    """User ids of ``requests`` requests; popularity rank is shuffled so it says nothing about the id."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, users + 1, dtype=np.float64) ** -exponent
    ranks = rng.choice(users, size=requests, p=p / p.sum())
    ids = rng.permutation(users)
    return [f"user-{ids[k]}" for k in ranks]


class LRU:
    """A vLLM server's adapter cache: hit moves to the front, miss loads and evicts the oldest."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, None] = OrderedDict()

    def access(self, key: str) -> bool:
        if key in self.items:
            self.items.move_to_end(key)
            return True
        self.items[key] = None
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return False


def simulate(router, replicas: list[str], traffic: list[str], cache: int, in_flight: int,
             home: dict[str, str] | None) -> dict[str, float]:
    caches = {r: LRU(cache) for r in replicas}
    served = dict.fromkeys(replicas, 0)
    held: deque[str] = deque()
    hits = spills = peak = 0
    for user in traffic:
        replica = router.route(user)
        router.acquire(replica)
        held.append(replica)
        peak = max(peak, router.in_flight()[replica])
        hits += caches[replica].access(user)
        served[replica] += 1
        if home is not None and replica != home[user]:
            spills += 1
        if len(held) >= in_flight:  # the oldest request completes
            router.release(held.popleft())
    counts = np.array(list(served.values()), dtype=np.float64)
    return {"hit": hits / len(traffic), "spill": spills / len(traffic),
            "imbalance": counts.max() / counts.mean(), "peak": peak}


def simulate_adapters(router, replicas: list[str], traffic: list[str], adapter_of, cache: int, in_flight: int,
                      pinned: list[str], warmup: int) -> dict[str, float]:
    """Adapter loads per 1,000 requests after ``warmup`` requests, and the balance of the replicas.
    ``adapter_of(user)`` names the adapter a user's request needs; ``pinned`` adapters are loaded on
    every replica up front and never evicted (prototypes); the rest share an LRU of ``cache``."""
    caches = {r: LRU(cache) for r in replicas}
    served = dict.fromkeys(replicas, 0)
    held: deque[str] = deque()
    loads = peak = 0
    pinned_set = set(pinned)
    for i, user in enumerate(traffic):
        replica = router.route(user) if not pinned_set else router.least_loaded()
        router.acquire(replica)
        held.append(replica)
        peak = max(peak, router.in_flight()[replica])
        adapter = adapter_of(user)
        if adapter not in pinned_set and not caches[replica].access(adapter) and i >= warmup:
            loads += 1
        served[replica] += 1
        if len(held) >= in_flight:
            router.release(held.popleft())
    while held:
        router.release(held.popleft())
    counts = np.array(list(served.values()), dtype=np.float64)
    return {"loads_per_1k": 1000.0 * loads / max(len(traffic) - warmup, 1), "imbalance": counts.max() / counts.mean(),
            "peak": peak}


def compare_prototypes(args, factors: list[float]) -> None:
    """Exact per-user adapters against ``args.prototypes`` prototypes, per user count."""
    n = int(args.replicas.split(",")[0])
    replicas = [f"http://vllm-{i}:8000" for i in range(n)]
    count = args.prototypes
    prototypes = [f"p{i}" for i in range(count)]
    print(f"{args.requests} requests, Zipf s={args.zipf}, {n} replicas, LRU of {args.cache} user adapters per "
          f"replica, {args.in_flight} in flight; loads counted after the first half of the traffic; "
          f"P={count} prototypes preloaded on every replica ({n * count} loads at activation)\n")
    header = (f"{'users':>9} {'mode':<26} {'loads / 1k req':>14} {'served max/mean':>15} "
              f"{'peak in-flight':>14} {'adapters':>8}")
    print(header)
    print("-" * len(header))
    for users in (int(x) for x in args.user_counts.split(",")):
        traffic = zipf_traffic(users, args.requests, args.zipf, args.seed)
        distinct = len(set(traffic))
        warmup = len(traffic) // 2
        c = factors[0]
        runs = [(f"exact, affinity c={c:g}", AffinityRouter(replicas, load_factor=c, vnodes=args.vnodes),
                 lambda u: u, [], distinct),
                ("exact, random", RandomRouter(replicas, seed=args.seed), lambda u: u, [], distinct),
                (f"prototypes P={count}, least", AffinityRouter(replicas, vnodes=args.vnodes),
                 lambda u: prototypes[stable_hash(u) % count], prototypes, count)]
        for name, router, adapter_of, pinned, adapters in runs:
            s = simulate_adapters(router, replicas, traffic, adapter_of, args.cache, args.in_flight, pinned, warmup)
            print(f"{users:>9} {name:<26} {s['loads_per_1k']:14.1f} {s['imbalance']:15.3f} {s['peak']:>14} "
                  f"{adapters:>8}")


def single_lru_hit_rate(traffic: list[str], capacity: int) -> float:
    lru = LRU(capacity)
    return sum(lru.access(u) for u in traffic) / len(traffic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of user popularity")
    ap.add_argument("--replicas", default="1,2,4,8", help="comma-separated replica counts")
    ap.add_argument("--cache", type=int, default=64, help="adapters cached per replica (--max-cpu-loras)")
    ap.add_argument("--in-flight", type=int, default=32, help="requests in flight at any time")
    ap.add_argument("--load-factors", default="1.25,2", help="comma-separated load factors c of the bound")
    ap.add_argument("--vnodes", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prototypes", type=int, default=0, help=(
        "compare exact adapters with this many prototypes (least-loaded routing), per --user-counts"))
    ap.add_argument("--user-counts", default="10000,100000,1000000", help="with --prototypes: comma-separated")
    args = ap.parse_args()
    factors = [float(x) for x in args.load_factors.split(",")]
    if args.prototypes:
        t0 = time.perf_counter()
        compare_prototypes(args, factors)
        print(f"\n({time.perf_counter() - t0:.1f} s)")
        return

    t0 = time.perf_counter()
    traffic = zipf_traffic(args.users, args.requests, args.zipf, args.seed)
    distinct = len(set(traffic))
    print(f"{args.requests} requests from {distinct} distinct users of {args.users} (Zipf s={args.zipf}), "
          f"LRU of {args.cache} adapters per replica, {args.in_flight} in flight, "
          f"{args.vnodes} vnodes; bound = ceil(c * in-flight / N)\n")
    header = (f"{'N':>3} {'router':<16} {'hit rate':>8} {'spill':>6} {'served max/mean':>15} "
              f"{'peak in-flight':>14} {'bound':>5} {'1 LRU of N*C':>12}")
    print(header)
    print("-" * len(header))
    for n in (int(x) for x in args.replicas.split(",")):
        replicas = [f"http://vllm-{i}:8000" for i in range(n)]
        ideal = single_lru_hit_rate(traffic, n * args.cache)
        idle = AffinityRouter(replicas, vnodes=args.vnodes)
        home = {u: idle.route(u) for u in set(traffic)}
        # (name, router, home replicas, bound at steady state: in_flight - 1 others + this request)
        runs = [(f"affinity c={c:g}", AffinityRouter(replicas, load_factor=c, vnodes=args.vnodes), home,
                 str(math.ceil(c * args.in_flight / n))) for c in factors]
        runs.append(("random", RandomRouter(replicas, seed=args.seed), None, "-"))
        for name, router, homes, bound in runs:
            s = simulate(router, replicas, traffic, args.cache, args.in_flight, homes)
            spill = f"{s['spill']:6.1%}" if homes is not None else f"{'-':>6}"
            print(f"{n:>3} {name:<16} {s['hit']:8.1%} {spill} {s['imbalance']:15.2f} "
                  f"{s['peak']:>14} {bound:>5} {ideal:12.1%}")
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
