"""Open-loop load against a gateway it starts: Poisson arrivals at multiples of the measured LLM
capacity, with and without the load mechanisms (queue-aware admission, shedding, the LLM score
cache), on loopback, bounded in time.

Traffic replays ML-100K users (their histories loaded into Redis under a prefix of the
benchmark's own): each user comes back 2-4 times, a few seconds to half a minute apart, with
overlapping candidates (a share of the previous visit's kept, the rest new random catalog items).
The LLM capacity is requests per second whose every candidate the engine scores, measured in the
same run by one caller with a long deadline. Per rate and gateway it reports: p50/p99/max latency
of admitted requests, the status histogram, shed share and shed p99, the share of candidates
answered with an LLM score on first and on repeat visits, LLM answers per second (responses that
carry LLM scores), abandoned forwards, answers saying ``history_unavailable``, peak RSS.

    python benchmarks/bench_load.py --data work/ml-100k --store work/store --version bench-v1
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_support import metric, peak_rss_mb, start_gateway, stop_gateway  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MECHANISMS_OFF = {"llm_admission": "pace", "llm_score_cache": "false", "max_inflight_score": "100000",
                  "max_inflight_events": "100000", "max_cpu_queue": "100000"}


@dataclass(order=True)
class Visit:
    due: float
    user: str = field(compare=False)
    number: int = field(compare=False)  # 0 = first visit
    left: int = field(compare=False)  # visits still to come after this one
    candidates: list[int] = field(compare=False)


@dataclass
class Outcome:
    repeat: bool
    status: int
    latency_ms: float
    candidates: int
    with_llm: int
    reasons: list[str]


class Workload:
    """Users and their visits, drawn from a seeded generator: every arrival serves the return
    visit that is most overdue, else a new user's first visit."""

    def __init__(self, users: list[str], items: np.ndarray, n_candidates: int, keep: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.users, self.items, self.n, self.keep = list(users), items, n_candidates, keep
        self.rng.shuffle(self.users)
        self.returns: list[Visit] = []

    def _fresh(self, k: int, exclude: set[int]) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            item = int(self.rng.choice(self.items))
            if item not in exclude and item not in out:
                out.append(item)
        return out

    def next(self, now: float) -> Visit:
        if self.returns and self.returns[0].due <= now:
            visit = heapq.heappop(self.returns)
        else:
            user = self.users.pop()
            visit = Visit(now, user, 0, int(self.rng.integers(1, 4)), self._fresh(self.n, set()))
        if visit.left:
            kept = [int(c) for c in self.rng.choice(visit.candidates, int(round(self.keep * self.n)), replace=False)]
            follow = kept + self._fresh(self.n - len(kept), set(kept))
            heapq.heappush(self.returns, Visit(now + float(self.rng.uniform(3.0, 30.0)), visit.user,
                                               visit.number + 1, visit.left - 1, follow))
        return visit


async def one(client: httpx.AsyncClient, visit: Visit, deadline_ms: int | None) -> Outcome:
    body: dict = {"user_id": visit.user, "candidates": visit.candidates}
    if deadline_ms:
        body["deadline_ms"] = deadline_ms
    start = time.perf_counter()
    try:
        response = await client.post("/v1/score", json=body)
        status = response.status_code
        data = response.json() if status == 200 else {}
    except httpx.HTTPError:
        status, data = 0, {}
    latency = (time.perf_counter() - start) * 1000.0
    scores = data.get("scores", [])
    return Outcome(visit.number > 0, status, latency, len(visit.candidates),
                   sum(s["llm_score"] is not None for s in scores), data.get("degraded_reasons", []))


async def run_rate(url: str, workload: Workload, rate: float, duration_s: float, deadline_ms: int | None,
                   seed: int) -> tuple[list[Outcome], float]:
    """Poisson arrivals at ``rate`` for ``duration_s``; waits for the answers (each bounded by the
    client timeout). Returns the outcomes and the wall time."""
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        start = time.perf_counter()
        tasks, t = [], 0.0
        while True:
            t += float(rng.exponential(1.0 / rate))
            if t > duration_s:
                break
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, workload.next(t), deadline_ms)))
        outcomes = list(await asyncio.gather(*tasks))
        return outcomes, time.perf_counter() - start


async def run_burst(url: str, workload: Workload, n: int, deadline_ms: int | None) -> tuple[list[Outcome], float]:
    """``n`` requests at the same instant: a spike far past any bound."""
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one(client, workload.next(0.0), deadline_ms) for _ in range(n)))
        return list(outcomes), time.perf_counter() - start


def capacity(url: str, users: list[str], items: np.ndarray, n_candidates: int, requests: int,
             seed: int) -> tuple[float, float]:
    """Requests per second one caller gets with every candidate LLM-scored (long deadline), and
    the median forward ms."""
    rng = np.random.default_rng(seed)
    times = []
    with httpx.Client(base_url=url, timeout=120.0) as client:
        for user in users[:requests]:
            candidates = [int(c) for c in rng.choice(items, n_candidates, replace=False)]
            start = time.perf_counter()
            body = client.post("/v1/score", json={"user_id": user, "candidates": candidates,
                                                  "deadline_ms": 60_000}).json()
            times.append(time.perf_counter() - start)
            if body.get("degraded"):
                raise SystemExit(f"capacity probe degraded: {body.get('degraded_reasons')}")
    median = float(np.median(times[1:] if len(times) > 1 else times))  # the first warms caches
    return 1.0 / median, median * 1000.0


def server_quantile_ms(before: str, after: str, status: str, q: float) -> float | None:
    """The gateway's own latency quantile of /v1/score answers with ``status`` over the run, as the
    upper bound of the histogram bucket that holds it (the client's figure adds its own waiting)."""
    def buckets(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if (sample.name == "reclora_http_request_duration_seconds_bucket" and labels.get("route") == "/v1/score"
                        and labels.get("status") == status):
                    out[float(labels["le"])] = float(sample.value)
        return out

    b, a = buckets(before), buckets(after)
    counts = sorted((le, a[le] - b.get(le, 0.0)) for le in a)
    if not counts or counts[-1][1] == 0:
        return None
    for le, cumulative in counts:
        if cumulative >= q * counts[-1][1]:
            return le * 1000.0
    return None


def summarize(outcomes: list[Outcome], wall_s: float, metrics: tuple[str, str], rss_mb: float) -> dict:
    admitted = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 429]
    before, after = metrics

    def share(repeat: bool) -> float | None:
        visits = [o for o in admitted if o.repeat == repeat]
        total = sum(o.candidates for o in visits)
        return sum(o.with_llm for o in visits) / total if total else None

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    lat = np.asarray([o.latency_ms for o in admitted]) if admitted else np.zeros(1)
    return {
        "requests": len(outcomes), "statuses": dict(sorted(Counter(o.status for o in outcomes).items())),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
        "shed_share": len(shed) / len(outcomes) if outcomes else 0.0,
        "shed_p99_ms": float(np.percentile([o.latency_ms for o in shed], 99)) if shed else None,
        "server_p99_ms": server_quantile_ms(before, after, "200", 0.99),
        "server_shed_p99_ms": server_quantile_ms(before, after, "429", 0.99),
        "llm_share_first": share(False), "llm_share_repeat": share(True),
        "llm_answers_per_s": sum(o.with_llm > 0 for o in admitted) / wall_s,
        "abandoned_forwards": delta("reclora_llm_abandoned_forwards_total"),
        "history_unavailable": sum("history_unavailable" in o.reasons for o in admitted),
        "reasons": dict(Counter(r for o in admitted for r in o.reasons)),
        "background_scored": delta("reclora_background_jobs_total", {"outcome": "scored"}),
        "background_dropped": delta("reclora_background_jobs_total", {"outcome": "dropped"}),
        "peak_rss_mb": rss_mb, "wall_s": wall_s,
    }


def add_gateway_args(ap: argparse.ArgumentParser, prefix: str, port: int) -> None:
    """The dataset, model store, base model, Redis and port arguments that ``load_users`` and
    ``gateway_settings`` read."""
    ap.add_argument("--data", type=Path, default=ROOT / "work/ml-100k", help="prepared ML-100K directory")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--base-model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--redis-cluster", action="store_true", help="--redis-url names a seed node of a cluster")
    ap.add_argument("--prefix", default=prefix)
    ap.add_argument("--port", type=int, default=port)


def gateway_settings(args, version: str) -> dict:
    """A benchmark gateway's settings: ``version`` from --store, histories under --prefix, deadlines
    up to a minute."""
    return dict(active_version=version, model_store=args.store, base_model_dir=args.base_model,
                redis_url=args.redis_url, redis_cluster=args.redis_cluster, redis_prefix=args.prefix,
                log_level="WARNING", model_poll_s=0, max_deadline_ms=60_000)


def delete_keys(args, match: str) -> None:
    """Delete the keys matching ``match`` (a SCAN pattern) on the benchmark's Redis."""
    from service.history import HistorySettings
    from service.history.clients import sync_client

    client = sync_client(HistorySettings(redis_url=args.redis_url, redis_cluster=args.redis_cluster))
    for key in client.scan_iter(match=match, count=10_000):
        client.delete(key)
    client.close()


def load_users(args) -> tuple[list[str], np.ndarray]:
    """Load the prepared dataset's histories into Redis under the benchmark's prefix."""
    from service.history import HistorySettings, bulk_load
    from training.data.samples import PreparedData
    from training.history_loader import histories_from_prepared

    store = HistorySettings(redis_url=args.redis_url, redis_cluster=args.redis_cluster)
    delete_keys(args, f"{args.prefix}*")  # an earlier run's histories and scores
    data = PreparedData.load(args.data)
    records = list(histories_from_prepared(data, until_split="test"))
    bulk_load(store, records, prefix=args.prefix, progress=False, total=len(records))
    users = [str(r[0]) for r in records if len(r[1]) >= 5]
    return users, data.items["item"].to_numpy(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_gateway_args(ap, prefix="bench-load:", port=8031)
    ap.add_argument("--version", required=True)
    ap.add_argument("--rates", default="0.5,1,2,4", help="multiples of the measured LLM capacity")
    ap.add_argument("--duration-s", type=float, default=90.0, help="arrivals per rate for this long")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--keep", type=float, default=0.75, help="share of a return visit's candidates kept")
    ap.add_argument("--deadline-ms", type=int, default=None, help="default: the gateway's default deadline")
    ap.add_argument("--capacity-requests", type=int, default=4)
    ap.add_argument("--modes", default="on,off", help="on = the load mechanisms, off = without them")
    ap.add_argument("--burst", type=int, default=0, help="then this many requests at once (0 = none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "work/bench-load.json")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    users, items = load_users(args)
    base = gateway_settings(args, args.version)
    url = f"http://127.0.0.1:{args.port}"
    results: dict = {"candidates": args.candidates, "duration_s": args.duration_s, "deadline_ms": args.deadline_ms}
    cursor = 0
    for mode in args.modes.split(","):
        settings = dict(base, **(MECHANISMS_OFF if mode == "off" else {}))
        proc = start_gateway(args.port, ROOT / f"work/bench-load-{mode}.log", settings)
        try:
            if "capacity_rps" not in results and args.rates:
                probe = users[cursor:cursor + args.capacity_requests]
                cursor += args.capacity_requests
                results["capacity_rps"], results["forward_ms"] = capacity(url, probe, items, args.candidates,
                                                                          len(probe), args.seed)
                print(f"LLM capacity: {results['capacity_rps']:.3f} requests/s "
                      f"({results['forward_ms']:.0f} ms per {args.candidates}-candidate pass)", flush=True)
            for multiple in [float(x) for x in args.rates.split(",") if x]:
                rate = multiple * results["capacity_rps"]
                # Each mode and rate gets users of its own: no cache carries over between runs.
                workload = Workload(users[cursor:], items, args.candidates, args.keep, args.seed)
                before = httpx.get(f"{url}/metrics").text
                outcomes, wall = asyncio.run(run_rate(url, workload, rate, args.duration_s, args.deadline_ms,
                                                      args.seed))
                cursor += len(users[cursor:]) - len(workload.users)
                summary = summarize(outcomes, wall, (before, httpx.get(f"{url}/metrics").text),
                                    peak_rss_mb(proc.pid))
                summary.update(rate_rps=rate, multiple=multiple)
                results.setdefault(mode, []).append(summary)
                print(f"[{mode}] {multiple}x ({rate:.3f}/s): {json.dumps(summary)}", flush=True)
                time.sleep(5)  # background work of this rate drains before the next
            if args.burst:
                workload = Workload(users[cursor:], items, args.candidates, 0.0, args.seed)
                before = httpx.get(f"{url}/metrics").text
                outcomes, wall = asyncio.run(run_burst(url, workload, args.burst, args.deadline_ms))
                cursor += len(users[cursor:]) - len(workload.users)
                summary = summarize(outcomes, wall, (before, httpx.get(f"{url}/metrics").text),
                                    peak_rss_mb(proc.pid))
                summary.update(burst=args.burst)
                results.setdefault(f"{mode}_burst", summary)
                print(f"[{mode}] burst of {args.burst}: {json.dumps(summary)}", flush=True)
        finally:
            stop_gateway(proc)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    if "capacity_rps" in results:
        print(f"\nLLM capacity {results['capacity_rps']:.3f} req/s; {results['candidates']} candidates; "
              f"deadline {results['deadline_ms'] or 'gateway default'}")
    header = ("mode", "rate", "req", "p50", "p99", "max", "5xx", "shed", "shed p99", "LLM 1st", "LLM rep",
              "LLM ans/s", "abandoned", "hist_unav", "RSS MB")
    print(" | ".join(header))
    for mode in ("on", "off", "on_burst", "off_burst"):
        rows = results.get(mode, [])
        for r in rows if isinstance(rows, list) else [dict(rows, multiple=f"burst of {rows['burst']}")]:
            fivexx = sum(n for s, n in r["statuses"].items() if int(s) >= 500 or int(s) == 0)
            pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
            rate = r["multiple"] if isinstance(r["multiple"], str) else f"{r['multiple']}x"
            print(" | ".join([mode.removesuffix("_burst"), rate, str(r["requests"]), f"{r['p50_ms']:.0f}",
                              f"{r['p99_ms']:.0f}", f"{r['max_ms']:.0f}", str(fivexx), pct(r["shed_share"]),
                              "-" if r["shed_p99_ms"] is None else f"{r['shed_p99_ms']:.1f}",
                              pct(r["llm_share_first"]), pct(r["llm_share_repeat"]),
                              f"{r['llm_answers_per_s']:.3f}", f"{r['abandoned_forwards']:.0f}",
                              str(r["history_unavailable"]), f"{r['peak_rss_mb']:.0f}"]))


if __name__ == "__main__":
    main()
