"""LLM answers per second of the embedded engine with concurrent callers of distinct users: one user
per forward against several users' requests packed into one forward (the RecLoRA mixture computed
in the forward), in one run on the same engine.

Each caller thread submits requests of its own users in a closed loop through the gateway's
``EngineScheduler`` (the same queue, the same packing rule): 20 candidates per request, ML-100K
users' real histories (before the validation split), the bundle's prompt form and gate; every request a
distinct user. Modes, each on the same requests in the same order:

- ``materialized``: today's adapters built per user (``UserAdapter``), one request per forward;
- ``mixture``: the user's gate weights over the banks (``UserMixture``), one request per forward;
- ``packed``: the same mixtures, waiting requests of several users in one forward up to
  ``--pack-tokens`` prompt tokens.

    python benchmarks/bench_pack.py --bundle work/store/VERSION --base-model models/smollm2-135m-instruct \\
        --data work/ml-100k [--callers 4] [--requests 24] [--pack-tokens 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch

from service.api.wiring import build_torch_engine
from service.config import BackgroundSettings, Settings
from service.engine.base import EngineCall
from service.model import load_model
from service.scoring.engine_scheduler import EngineScheduler
from service.scoring.stages import UserHistoryView, build_adapter, run_crm, text_inputs, user_mixture
from training.data.samples import PreparedData
from training.history_loader import histories_from_prepared


def requests(model, builder, data_dir: Path, n: int, candidates: int, seed: int) -> list[tuple[object, object, object]]:
    """(materialized adapter, mixture, prompts) of ``n`` distinct users with at least 20 behaviours."""
    data = PreparedData.load(data_dir)
    records = [r for r in histories_from_prepared(data, until_split="valid") if len(r[1]) >= 20]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(records), n, replace=False)
    catalog = data.items["item"].to_numpy(np.int64)
    out = []
    for i in picked:
        user, items, ratings, _, profile = records[int(i)]
        view = UserHistoryView.from_raw(model, items, ratings, profile)
        dense = model.catalog.to_dense(rng.choice(catalog, candidates, replace=False))
        alphas = model.mixer.mixtures(run_crm(model, view, dense).user_rep)
        out.append((build_adapter(model, user, alphas), user_mixture(model, user, alphas),
                    text_inputs(builder, model, view, dense)))
    return out


def run(engine, work: list[tuple[object, object, object]], mode: str, callers: int, pack_tokens: int,
        threads: int) -> tuple[float, list[float], int]:
    """(answers per second, per-request latencies in ms, forwards the engine ran)."""
    settings = BackgroundSettings(engine_pack_tokens=pack_tokens if mode == "packed" else 0)
    scheduler = EngineScheduler(settings, intra_op_threads=threads)
    forwards = [0]
    engine.observe_rows = lambda rows: forwards.__setitem__(0, forwards[0] + 1)
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(mine: list[tuple[object, object, object]]) -> None:
        for adapter, mixture, prompts in mine:
            start = time.perf_counter()
            call = EngineCall(adapter if mode == "materialized" else mixture, prompts.prefix, prompts.suffixes)
            scheduler.submit_call(engine, call, 0.0).result(600)
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)

    shares = [work[i::callers] for i in range(callers)]
    threads_ = [threading.Thread(target=caller, args=(share,)) for share in shares]
    start = time.perf_counter()
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    seconds = time.perf_counter() - start
    scheduler.close()
    engine.observe_rows = None
    return len(work) / seconds, latencies, forwards[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--base-model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--callers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24, help="distinct users, each one request, per mode")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--pack-tokens", type=int, default=BackgroundSettings().engine_pack_tokens)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--modes", default="materialized,mixture,packed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = load_model(args.bundle)
    settings = Settings(base_model_dir=args.base_model, model_store=args.bundle.parent, active_version=args.bundle.name)
    engine, builder = build_torch_engine(settings, model)
    work = requests(model, builder, args.data, args.requests + 2, args.candidates, args.seed)
    warm, work = work[:2], work[2:]
    tokens = [len(p.prefix) + sum(len(s) for s in p.suffixes) for _, _, p in work]
    print(f"bundle {args.bundle.name}, {model.prompt.form} prompts, {args.requests} users x {args.candidates} "
          f"candidates ({np.mean(tokens):.0f} prompt tokens per request), {args.callers} callers, "
          f"{args.threads} threads, dtype {next(engine.model.parameters()).dtype}, pack budget {args.pack_tokens}")
    print("| mode | LLM answers/s | p50 ms | p99 ms | forwards | vs materialized |")
    print("|---|---|---|---|---|---|")
    first = None
    for mode in args.modes.split(","):
        run(engine, warm, mode, 1, args.pack_tokens, args.threads)
        rate, latencies, forwards = run(engine, work, mode, args.callers, args.pack_tokens, args.threads)
        first = first or rate
        print(f"| {mode} | {rate:.2f} | {np.percentile(latencies, 50):.0f} | {np.percentile(latencies, 99):.0f} | "
              f"{forwards} | {rate / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
