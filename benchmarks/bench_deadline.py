"""First visits at the gateway's deadline: how often the LLM answers in time, per bundle version.

For each ``--versions`` bundle (e.g. one exported from a per-target LoRA and one from a shared-form
LoRA, both ``--serve fused``), a gateway is started on loopback and closed-loop callers (each
sends its next request when the last is answered) post first visits for ``--duration-s``: every
request a user not seen before in that phase, with ``--candidates`` random catalog items, at the
gateway's default deadline unless ``--deadline-ms`` is given. Every version gets the same users
and candidates in the same order, so the forms are compared on the same traffic in one run.

``--threads-nice 0,10`` runs every version once per ``RECLORA_GATEWAY_THREADS_NICE`` value (the
event loop's nice increment beside the embedded engine; the gateway's default otherwise), on the
same users, so the setting is compared in one run.

Per version and caller count it prints: requests, the share answered with an LLM score for every
candidate (the live LLM answered in time), p50/p99/max end to end, LLM answers per second, and the
degrade reasons; a phase shorter than ``--duration-s`` ran out of users (each is visited once).
ML-100K histories are loaded into Redis under the benchmark's own prefix.

    python benchmarks/bench_deadline.py --store work/store --versions per-target-v1,shared-v1 \\
        --callers 1,4 --duration-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_load import Outcome, Visit, add_gateway_args, delete_keys, gateway_settings, load_users, one  # noqa: E402
from gateway_support import start_gateway, stop_gateway  # noqa: E402


def first_visits(users: list[str], items: np.ndarray, n_candidates: int, seed: int) -> list[Visit]:
    """One visit per user, each with its own random candidates, in a seeded order."""
    rng = np.random.default_rng(seed)
    order = list(users)
    rng.shuffle(order)
    return [Visit(0.0, user, 0, 0, [int(c) for c in rng.choice(items, n_candidates, replace=False)]) for user in order]


async def closed_loop(url: str, visits: list[Visit], callers: int, duration_s: float,
                      deadline_ms: int | None) -> tuple[list[Outcome], float]:
    """``callers`` tasks, each taking the next visit when its last answer came, for ``duration_s``."""
    queue = iter(visits)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        start = time.perf_counter()

        async def caller() -> None:
            while time.perf_counter() - start < duration_s:
                visit = next(queue, None)
                if visit is None:
                    return
                outcomes.append(await one(client, visit, deadline_ms))

        await asyncio.gather(*(caller() for _ in range(callers)))
        return outcomes, time.perf_counter() - start


def summary(outcomes: list[Outcome], wall_s: float) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    latencies = np.array([o.latency_ms for o in ok]) if ok else np.array([np.nan])
    return {"requests": len(outcomes), "statuses": dict(Counter(str(o.status) for o in outcomes)),
            "llm_share": sum(o.with_llm == o.candidates for o in ok) / max(len(ok), 1),
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "max_ms": float(latencies.max()), "llm_answers_per_s": sum(o.with_llm == o.candidates for o in ok) / wall_s,
            "requests_per_s": len(ok) / wall_s, "reasons": dict(Counter(r for o in ok for r in o.reasons)),
            "wall_s": wall_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_gateway_args(ap, prefix="bench-deadline:", port=8033)
    ap.add_argument("--versions", required=True, help="bundle versions in --store, comma-separated")
    ap.add_argument("--callers", default="1,4", help="closed-loop caller counts, comma-separated")
    ap.add_argument("--duration-s", type=float, default=30.0, help="per version and caller count")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--deadline-ms", type=int, default=None, help="default: the gateway's default deadline")
    ap.add_argument("--warmup", type=int, default=3, help="requests of users of their own before each phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads-nice", default="", help="RECLORA_GATEWAY_THREADS_NICE values, comma-separated "
                    "(each version runs once per value; default: the gateway's own)")
    ap.add_argument("--out", type=Path, default=ROOT / "work/bench-deadline.json")
    args = ap.parse_args()

    users, items = load_users(args)
    callers = [int(c) for c in args.callers.split(",") if c]
    visits = first_visits(users, items, args.candidates, args.seed)
    warmup, visits = visits[: args.warmup * len(callers)], visits[args.warmup * len(callers):]
    phase_users = len(visits) // len(callers)  # each caller count its own users, the same for every version
    results: dict = {"candidates": args.candidates, "deadline_ms": args.deadline_ms, "duration_s": args.duration_s,
                     "versions": {}}
    nices = [int(n) for n in args.threads_nice.split(",") if n.strip()] or [None]
    for version, nice in [(v, n) for v in args.versions.split(",") if v for n in nices]:
        settings = gateway_settings(args, version) | ({} if nice is None else {"gateway_threads_nice": nice})
        version = version if nice is None else f"{version} nice={nice}"  # the row's label
        proc = start_gateway(args.port, ROOT / f"work/bench-deadline-{version.replace(' ', '-')}.log", settings)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for i, n in enumerate(callers):
                own_warmup = warmup[i * args.warmup:(i + 1) * args.warmup]
                asyncio.run(closed_loop(url, own_warmup, 1, 600.0, 60_000))  # the engine's pace and first forwards
                phase = visits[i * phase_users:(i + 1) * phase_users]
                outcomes, wall = asyncio.run(closed_loop(url, phase, n, args.duration_s, args.deadline_ms))
                row = summary(outcomes, wall)
                results["versions"].setdefault(version, {})[str(n)] = row
                print(f"[{version}] {n} caller(s): {json.dumps(row)}", flush=True)
                time.sleep(3)  # background work of this phase drains before the next
        finally:
            stop_gateway(proc)
        delete_keys(args, f"{args.prefix}*:llm:*")  # its kept LLM scores: the next variant sees first visits too
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{args.candidates} candidates, first visits, deadline {args.deadline_ms or 'gateway default'}")
    print("| version | callers | requests (s) | statuses | LLM answered every candidate | p50 ms | p99 ms | max ms "
          "| LLM answers/s | reasons |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for version, rows in results["versions"].items():
        for n, r in rows.items():
            print(f"| {version} | {n} | {r['requests']} ({r['wall_s']:.0f}) | {r['statuses']} | "
                  f"{100 * r['llm_share']:.1f}% | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | "
                  f"{r['llm_answers_per_s']:.2f} | {r['reasons']} |")


if __name__ == "__main__":
    main()
