"""What LLM knowledge costs the CRM stage: ``run_crm`` latency of a plain and a knowledge CRM.

In process, no HTTP, no Redis: both CRMs are exported as bundles and loaded with the runtime's
``load_model`` (so the knowledge CRM's catalog vectors, item knowledge included, are built once at
load as serving builds them), then the CRM stage (``service.scoring.stages.run_crm``) scores the
same request on each: the user with the longest history (capped at ``l_long`` by the stage) and
``--candidates`` random items, the knowledge CRM also reading the user's D-dim vector. The two
run interleaved, alternating which goes first, after a warm-up, so drift and noise hit both alike.

Data: ``--data`` (default work/ml-100k, else a synthetic dataset of the same size with random
384-d item embeddings). Plain CRM: ``--crm`` (default DATA/crm when present) else a freshly built
one of the same architecture. Knowledge CRM: ``--knowledge-crm`` (a trained checkpoint) else the
plain one's architecture with ``knowledge_dim`` = D; its vectors come from ``--knowledge`` (a
knowledge directory) or are random (D = ``--dim``, default 384, the size of MiniLM vectors).
Weights do not change the cost, so untrained CRMs time like trained ones.

Reported: p50, p99 and mean of each (ms), the p50 difference and the median of the paired
per-repetition differences; the target is a knowledge p50 within +2 ms of the plain one.

Run (from the repository root; ~1 min for the default 400 repetitions on two CPU cores):

    .venv/bin/python benchmarks/bench_crm_knowledge.py --reps 400 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dataset(path: Path, tmp: Path):
    """(data directory, PreparedData): the prepared dataset at ``path``, else a synthetic one."""
    from training.data.samples import PreparedData, prepare
    from training.data.synthetic import generate_synthetic

    if (path / "samples.parquet").is_file() and (path / "embeddings.npy").is_file():
        return path, PreparedData.load(path)
    data = prepare(generate_synthetic(n_users=943, n_items=1682, n_interactions=100_000, seed=0))
    out = data.save(tmp / "data")
    emb = np.random.default_rng(0).normal(size=(len(data.items) + 1, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0
    np.save(out / "embeddings.npy", emb)
    return out, data


def knowledge_arrays(data, directory: Path | None, dim: int, seed: int):
    from training.crm.knowledge import KnowledgeArrays, load_knowledge

    if directory is not None:
        return load_knowledge(directory, data)
    rng = np.random.default_rng(seed)

    def unit(n: int) -> np.ndarray:
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x[0] = 0
        return x

    n_users = int(data.users["user_idx"].max()) + 1
    has = np.ones(n_users, bool)
    has[0] = False
    return KnowledgeArrays(unit(int(data.items["item_idx"].max()) + 1), unit(n_users), has,
                           {"encoder": "random", "dim": dim})


def fresh_checkpoint(data, embeddings: np.ndarray, out: Path, architecture: dict, knowledge=None) -> Path:
    """An untrained CRM of ``architecture`` (a CRMConfig dict) saved as a checkpoint."""
    from service.crm.loading import build_crm
    from service.crm.model import CRMConfig
    from training.crm.checkpoint import save_checkpoint
    from training.crm.train import TrainedCRM, feature_space_for

    space = feature_space_for(data)
    config = CRMConfig.model_validate({**architecture, "knowledge_dim": knowledge.dim if knowledge else 0})
    parts = (knowledge.item_vectors, knowledge.user_default()) if knowledge else None
    model = build_crm(config, space, data.items, embeddings, knowledge=parts).eval()
    return save_checkpoint(TrainedCRM(model, config, space, [], {}, 0.0, knowledge), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "work" / "ml-100k")
    ap.add_argument("--crm", type=Path, help="plain CRM checkpoint (default DATA/crm when present)")
    ap.add_argument("--knowledge-crm", type=Path, help="trained knowledge CRM checkpoint")
    ap.add_argument("--knowledge", type=Path, help="knowledge directory (default: random vectors)")
    ap.add_argument("--dim", type=int, default=384, help="size of random knowledge vectors")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (serving: RECLORA_TORCH_THREADS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from service.crm.loading import config_for
    from service.model import load_model
    from service.scoring.stages import UserHistoryView, run_crm
    from training.crm.checkpoint import FILES, load_user_knowledge
    from training.crm.train import feature_space_for
    from training.export.crm_bundle import export_crm_bundle

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_dir, data = dataset(args.data, tmp)
        embeddings = np.load(data_dir / "embeddings.npy", allow_pickle=False)
        plain_dir = args.crm or data_dir / "crm"
        if not (plain_dir / FILES["weights"]).is_file():  # the architecture `reclora train-crm` trains by default
            default = config_for(feature_space_for(data), embeddings.shape[1], emb_dim=16, dropout=0.2)
            plain_dir = fresh_checkpoint(data, embeddings, tmp / "plain", default.model_dump())
        architecture = json.loads((plain_dir / FILES["config"]).read_text())
        if args.knowledge_crm is not None:
            knowledge_dir = args.knowledge_crm
        else:
            arrays = knowledge_arrays(data, args.knowledge, args.dim, args.seed)
            knowledge_dir = fresh_checkpoint(data, embeddings, tmp / "knowledge", architecture, arrays)
        plain = load_model(export_crm_bundle(data_dir, plain_dir, tmp / "store", "plain"))
        know = load_model(export_crm_bundle(data_dir, knowledge_dir, tmp / "store", "knowledge"))
        users = load_user_knowledge(knowledge_dir)

        counts = data.events.groupby("user_idx").size()
        user = int(counts.idxmax())
        events = data.events[data.events["user_idx"] == user]
        row = data.users[data.users["user_idx"] == user].iloc[0]
        profile = {c: str(v) for c, v in row.items() if c not in ("user", "user_idx")}
        items, ratings = np.array(events["item_idx"], np.int64), np.array(events["rating"], np.float32)
        views = {"plain": UserHistoryView(items, ratings, profile),
                 "knowledge": UserHistoryView(items, ratings, profile, users[user].copy())}
        models = {"plain": plain, "knowledge": know}
        rng = np.random.default_rng(args.seed)
        candidates = rng.choice(np.arange(1, len(data.items) + 1), size=args.candidates, replace=False)

        times: dict[str, list[float]] = {"plain": [], "knowledge": []}
        for rep in range(args.warmup + args.reps):
            order = ("plain", "knowledge") if rep % 2 == 0 else ("knowledge", "plain")
            for name in order:
                start = time.perf_counter()
                run_crm(models[name], views[name], candidates)
                if rep >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1000)

    summary = {name: {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
                      "mean_ms": float(np.mean(t))} for name, t in times.items()}
    paired = np.asarray(times["knowledge"]) - np.asarray(times["plain"])
    result = {
        "data": str(data.meta.get("dataset")), "history": int(min(len(items), plain.crm_config.l_long)),
        "candidates": args.candidates, "reps": args.reps, "threads": args.threads,
        "knowledge_dim": know.crm_config.knowledge_dim, **summary,
        "p50_difference_ms": summary["knowledge"]["p50_ms"] - summary["plain"]["p50_ms"],
        "paired_median_difference_ms": float(np.median(paired)),
    }
    result["within_target"] = result["p50_difference_ms"] <= 2.0
    print(f"run_crm, {result['data']}: history {result['history']}, {args.candidates} candidates, "
          f"{args.reps} reps, {args.threads} thread(s), knowledge D={result['knowledge_dim']}")
    print("| CRM | p50 ms | p99 ms | mean ms |\n|---|---|---|---|")
    for name in ("plain", "knowledge"):
        s = summary[name]
        print(f"| {name} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['mean_ms']:.2f} |")
    print(f"knowledge - plain: p50 {result['p50_difference_ms']:+.2f} ms, paired median "
          f"{result['paired_median_difference_ms']:+.2f} ms (target: p50 within +2 ms: "
          f"{'met' if result['within_target'] else 'NOT met'})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
