"""Benchmark of ``train-llm`` under torchrun: one process against N, on the same data and global batch.

In one run:

(a) wall time of ``reclora train-llm`` in one process and under ``torchrun --nproc-per-node N``
    (each process --threads T, OMP_NUM_THREADS=T), same settings, each into its own directory;
    their loss curves and best validation AUC side by side (they must agree: the same run).
(b) per-step compute: seconds of one optimizer step (forward and backward of --batch-size x
    --grad-accum instances, packed, and the AdamW step) in this process with T threads, timed over
    --steps steps of the run's own instances after one warm-up step; FLOPs per step from the real
    token counts (``bench_train.flops_per_instance``).
(c) communication: the trainable parameters the ranks all-reduce each step (the LoRA, the gates),
    their bytes in float32, and the time of that all-reduce (``Ranks.sum_gradients``, exactly what a
    step runs) between N local gloo processes, median of --reduces.
(d) an estimate for G GPUs (``--gpus``), from (b) and (c) and the assumptions it prints: the step's
    FLOPs at an assumed effective GPU rate, a floor per micro-batch (kernel launches), and a ring
    all-reduce of (c)'s bytes at --bandwidth.

A machine with no more cores than the N x T threads cannot show a distributed speedup in (a):
one process with N x T threads (``--wide``) uses the same cores. Run:
    python benchmarks/bench_distributed.py --data work/ml-100k --crm DIR --base-model \
        models/smollm2-135m-instruct --out DIR --n-samples 32 --valid-samples 16 --batch-size 4 \
        --grad-accum 4 [--wide]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import flops_per_instance  # noqa: E402
from training.data.samples import PreparedData  # noqa: E402
from training.distributed import Ranks, process_group  # noqa: E402
from training.llm.resume import Progress  # noqa: E402
from training.llm.train import (LLMTrainConfig, Run, build_model, build_optimization, optimizer_step,  # noqa: E402
                                prepare_samples)


def train_args(args, out: Path, threads: int | None = None) -> list[str]:
    return ["train-llm", "--data", str(args.data), "--base-model", str(args.base_model), "--crm", str(args.crm),
            "--out", str(out), "--mode", args.mode, "--n-samples", str(args.n_samples),
            "--valid-samples", str(args.valid_samples), "--batch-size", str(args.batch_size),
            "--grad-accum", str(args.grad_accum), "--dtype", args.dtype, "--threads", str(threads or args.threads),
            "--checkpoint-every", "0", "--seed", str(args.seed)]


def timed_run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds


def wall_times(args) -> dict:
    """(a): one process, then N under torchrun; their summaries."""
    one, many = args.out / "processes-1", args.out / f"processes-{args.processes}"
    for d in (one, many):
        if (d / "train.json").exists():
            (d / "train.json").unlink()
    t1 = timed_run([sys.executable, "-m", "training.cli", *train_args(args, one)], args.threads)
    tn = timed_run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes),
                    "--standalone", "-m", "training.cli", *train_args(args, many)], args.threads)
    s1, sn = (json.loads((d / "train.json").read_text()) for d in (one, many))
    print(f"(a) wall time, {args.threads} thread(s) per process, {os.cpu_count()} CPUs: 1 process {t1:.1f} s "
          f"(training {s1['train_seconds']:.1f} s); {args.processes} processes {tn:.1f} s (training "
          f"{sn['train_seconds']:.1f} s); ratio {t1 / tn:.2f}x wall, {s1['train_seconds'] / sn['train_seconds']:.2f}x "
          "training")
    for name, s in (("1", s1), (str(args.processes), sn)):
        print(f"    {name} process(es): train loss {[round(h['train_loss'], 6) for h in s['history']]}, valid AUC "
              f"{[round(h['valid_auc'], 6) for h in s['history']]}, best {s['best_valid_auc']:.6f}")
    return {"one_s": t1, "many_s": tn, "one": s1, "many": sn}


def wide_run(args, many_s: float | None) -> None:
    """(a), the fair baseline on a machine with no spare cores: one process with all the threads
    the N processes use."""
    wide = args.out / "processes-1-wide"
    (wide / "train.json").unlink(missing_ok=True)
    threads = args.threads * args.processes
    tw = timed_run([sys.executable, "-m", "training.cli", *train_args(args, wide, threads)], threads)
    sw = json.loads((wide / "train.json").read_text())
    against = f"; against it {args.processes} processes: {tw / many_s:.2f}x wall" if many_s else ""
    print(f"(a) 1 process with {threads} threads (the cores the {args.processes} processes use): {tw:.1f} s "
          f"(training {sw['train_seconds']:.1f} s){against}")


def step_compute(args) -> dict:
    """(b): seconds and FLOPs of one optimizer step of the run's instances in this process."""
    torch.set_num_threads(args.threads)
    data = PreparedData.load(args.data)
    embeddings = np.load(args.data / "embeddings.npy", allow_pickle=False)
    step = args.batch_size * args.grad_accum
    lora = dict(r=8, lora_alpha=16.0, n_meta=8 if args.mode == "reclora" else 1, gated=args.mode == "reclora")
    cfg = LLMTrainConfig(n_samples=(args.steps + 1) * step // 2, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         valid_samples=4, dtype=args.dtype, progress=False, lora=lora, seed=args.seed)
    model = build_model(args.base_model, data, cfg)
    samples = prepare_samples(data, embeddings, args.crm, cfg, model.scorer)
    run = Run(cfg, args.out, model, samples, build_optimization(cfg, model, samples.instances))
    trainable = sum(p.numel() for g in run.opt.optimizer.param_groups for p in g["params"])
    state, times = Progress(), []
    for s in range(args.steps + 1):
        start = time.perf_counter()
        optimizer_step(run, list(range(s * step, (s + 1) * step)), state)
        times.append(time.perf_counter() - start)
    lengths = samples.instances.lengths[: (args.steps + 1) * step]
    flops = flops_per_instance(model.model.config, model.lora.cfg, lengths) * step
    seconds = statistics.median(times[1:])
    print(f"(b) one optimizer step ({step} instances, {np.mean(lengths):.0f} tokens each, {args.dtype}, "
          f"{args.threads} thread(s)): {seconds:.2f} s (median of {args.steps}), {flops / 1e12:.2f} TFLOP "
          f"(forward + input gradient), {flops / seconds / 1e9:.0f} GFLOP/s")
    return {"step_s": seconds, "flops_per_instance": flops / step, "trainable": trainable, "instances": step}


def _reduce_body(rank: int, world: int, port: int, numel: int, repeats: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group("cpu") as ranks:
        param = torch.nn.Parameter(torch.zeros(numel))
        times = []
        for _ in range(repeats + 1):
            param.grad = torch.ones(numel)
            ranks.barrier()
            start = time.perf_counter()
            ranks.sum_gradients([param])
            times.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps(times[1:]))


def reduce_time(args, numel: int) -> float:
    """(c): the median seconds of the step's all-reduce between N local gloo processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.out / "reduce.json"
    torch.multiprocessing.start_processes(_reduce_body, args=(args.processes, port, numel, args.reduces, str(out)),
                                          nprocs=args.processes, start_method="spawn")
    seconds = statistics.median(json.loads(out.read_text()))
    print(f"(c) all-reduce per step: {numel:,} trainable parameters, {numel * 4 / 2**20:.1f} MiB in float32; "
          f"{seconds * 1e3:.1f} ms between {args.processes} local gloo processes (median of {args.reduces})")
    return seconds


def estimate(args, compute: dict) -> None:
    """(d): G GPUs at the same global batch (--global-batch instances in micro-batches of
    --gpu-micro-batch), from (b)'s FLOPs per instance and (c)'s bytes."""
    g, step, micro = args.gpus, args.global_batch, args.gpu_micro_batch
    flops = compute["flops_per_instance"] * step
    micro_per_step = -(-step // micro)
    t1 = max(flops / (args.gpu_tflops * 1e12), micro_per_step * args.micro_floor_ms / 1e3)
    per_rank = -(-step // g)
    micro_per_rank = -(-per_rank // micro)
    comm = 2 * (g - 1) / g * compute["trainable"] * 4 / (args.bandwidth * 1e9) + 2 * (g - 1) * args.latency_us / 1e6
    tg = max(flops / g / (args.gpu_tflops * 1e12), micro_per_rank * args.micro_floor_ms / 1e3) + comm
    print(f"(d) estimate for {g} GPUs at the global batch of {step} instances ({flops / 1e12:.1f} TFLOP a step; assumed: {args.gpu_tflops:.0f} TFLOP/s "
          f"effective per GPU, a floor of {args.micro_floor_ms:.0f} ms per micro-batch forward + backward, ring "
          f"all-reduce at {args.bandwidth:.0f} GB/s with {args.latency_us:.0f} us per hop): 1 GPU {t1 * 1e3:.1f} ms "
          f"a step ({micro_per_step} micro-batches); {g} GPUs {tg * 1e3:.1f} ms ({micro_per_rank} micro-batch(es) of "
          f"{per_rank} instances each, all-reduce {comm * 1e3:.3f} ms): {t1 / tg:.1f}x")
    big = step * g
    t1_big = max(flops * g / (args.gpu_tflops * 1e12), g * micro_per_step * args.micro_floor_ms / 1e3)
    tg_big = t1 + comm
    print(f"    at a global batch of {big} ({step} a GPU): 1 GPU {t1_big * 1e3:.0f} ms a step, {g} GPUs "
          f"{tg_big * 1e3:.1f} ms: {t1_big / tg_big:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--crm", type=Path, required=True)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="reclora")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--valid-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1, help="(b): optimizer steps timed after one warm-up")
    parser.add_argument("--reduces", type=int, default=20, help="(c): all-reduces timed")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=32, help="(d): instances a step (train-llm: 8 x 4)")
    parser.add_argument("--gpu-micro-batch", type=int, default=8, help="(d): instances a micro-batch")
    parser.add_argument("--gpu-tflops", type=float, default=200.0, help="(d): assumed effective bf16 TFLOP/s")
    parser.add_argument("--micro-floor-ms", type=float, default=15.0,
                        help="(d): assumed least time of a micro-batch's forward + backward (kernel launches)")
    parser.add_argument("--bandwidth", type=float, default=300.0, help="(d): all-reduce bus bandwidth, GB/s")
    parser.add_argument("--latency-us", type=float, default=10.0, help="(d): latency per ring hop")
    parser.add_argument("--skip-runs", action="store_true", help="leave out (a)")
    parser.add_argument("--only-runs", action="store_true", help="(a) alone")
    parser.add_argument("--wide", action="store_true",
                        help="(a): also one process with processes x threads threads, the same cores")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times = None if args.skip_runs else wall_times(args)
    if args.wide:
        wide_run(args, times and times["many_s"])
    if args.only_runs:
        return
    compute = step_compute(args)
    reduce_time(args, compute["trainable"])
    estimate(args, compute)


if __name__ == "__main__":
    main()
