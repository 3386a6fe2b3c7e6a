"""Benchmark of the LoRA training loop: packed (padding-free) micro-batches against right-padded ones.

In one run, on the same instances (prompts of a prepared dataset, both ReiT views) and seed:

(a) speed: instances per second of the packed loop (train-llm's default) and of the padded loop
    (``--no-packing``), in --dtype; the loops take turns step by step on the same rows, so a
    shared CPU's load falls on both alike. One warm-up step each, then --instances each.
(b) the floor: forward + backward FLOPs per instance from the real token counts and the model's
    shapes (every projection and MLP matmul forward and its input gradient, as the base weights
    are frozen; causal attention forward (2 matmuls) and backward (4); the LoRA; the head at the
    answer position) over the matmul rate measured in this run at the model's shapes and a packed
    row's token count, in the same dtype; each loop's time over it.
(c) memory: each loop's peak resident-set growth over a step (RSS sampled every 2 ms from
    /proc/self/statm, freed memory trimmed before each step), and the process's RSS high-water.
(d) float32 loss curves of both loops over the first --steps optimizer steps on the same data
    order, from the same initial LoRA, side by side with the largest absolute difference.

With ``--forms R``, instead: training seconds per instance of the two prompt forms on the same
samples, taking turns request by request: the per-target form's prompts (each sample its own
history, packed by --batch-size) against the shared form's requests of up to R samples (one
history for the request, the prefix once; ``train-llm --prompt-form shared --request-size R``),
with tokens per instance, in --dtype.

Run: python benchmarks/bench_train.py --data work/ml-100k --instances 64 --steps 50
     python benchmarks/bench_train.py --data work/ml-100k --instances 160 --forms 20
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.llm.personalized_lora import PersonalizedLoRA, PersonalizedLoRAConfig  # noqa: E402
from service.llm.precision import resolve_dtype  # noqa: E402
from training.data.samples import PreparedData  # noqa: E402
from training.llm.crm_outputs import user_representations  # noqa: E402
from training.llm.loading import load_base  # noqa: E402
from training.llm.offline_scoring import LLMScorer  # noqa: E402
from training.llm.prompts import prompt_config_for  # noqa: E402
from training.llm.requests import anchored_requests, request_slices  # noqa: E402
from training.llm.train import LLMTrainConfig  # noqa: E402
from training.llm.train_step import AnswerLoss, TrainSet, accumulate_step  # noqa: E402

LOOPS = {"packed": True, "padded": False}


class RssPeak:
    """Peak resident set size (MB) above the level at entry, sampled on a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, 0.0
        self._page = resource.getpagesize() / 2**20

    def rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> "RssPeak":
        _trim()
        self.base = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss() - self.base)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def _trim() -> None:
    """Hand freed heap back to the OS so one loop's leftovers do not hide the next one's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def instances(args, model, tokenizer, lora_cfg: PersonalizedLoRAConfig) -> tuple[TrainSet, str]:
    """``args.instances`` training instances: half the samples in each ReiT view, users from the
    dataset's CRM when it has one (random otherwise: the cost is the same)."""
    data = PreparedData.load(args.data)
    embeddings = np.load(args.data / "embeddings.npy", allow_pickle=False)
    n = max(1, args.instances // 2)
    train = data.split("train").sample(n=min(n, len(data.split("train"))), random_state=args.seed)
    scorer = LLMScorer(model, tokenizer, None, args.k_text, prompt_config_for(data.meta))
    prompts = scorer.prompts(data, train, embeddings, "recent") + scorer.prompts(data, train, embeddings, "semantic")
    crm = args.data / "crm"
    if (crm / "weights.safetensors").is_file():
        reps, source = user_representations(data, train, crm, embeddings), "the dataset's CRM"
    else:
        reps = torch.randn(len(train), lora_cfg.user_dim, generator=torch.Generator().manual_seed(args.seed))
        source = "random (no CRM checkpoint in --data)"
    labels = train["label"].tolist() * 2
    return TrainSet.build(prompts, torch.cat([reps, reps]), labels, scorer.builder.yes_id, scorer.builder.no_id,
                          model.device), source


def flops_per_instance(config, lora_cfg: PersonalizedLoRAConfig, lengths: list[int]) -> float:
    """Forward + backward FLOPs the loop must do per instance (see the module docstring)."""
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = d * q + 2 * d * kv + q * d + 3 * d * inter  # multiply-adds per token per layer
    outs = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": d}
    lora = sum(lora_cfg.r * (d + outs[m]) for m in lora_cfg.target_modules if m in outs)
    per_token = 2 * layers * (linear + lora) * 2  # forward and the input gradient
    attention = sum(2 * 2 * q * n * (n + 1) / 2 * layers * 3 for n in lengths)  # causal: fwd 2 matmuls, bwd 4
    head = 2 * d * config.vocab_size * 2 * len(lengths)
    return (per_token * sum(lengths) + attention + head) / len(lengths)


def matmul_rate(config, dtype: torch.dtype, tokens: int, seconds: float = 3.0) -> float:
    """FLOP/s of the model's projection shapes at ``tokens`` rows, weighted as a layer uses them."""
    d, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, inter), (d, inter), (inter, d)]
    xs = {k: torch.randn(tokens, k, dtype=dtype) for k in {s[0] for s in shapes}}
    ws = [torch.randn(n, k, dtype=dtype) for k, n in shapes]
    flops = sum(2 * tokens * k * n for k, n in shapes)
    for w, (k, _) in zip(ws, shapes):  # warm up
        torch.nn.functional.linear(xs[k], w)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for w, (k, _) in zip(ws, shapes):
            torch.nn.functional.linear(xs[k], w)
        runs += 1
    return flops * runs / (time.perf_counter() - start)


def speed(args, dtype: str) -> None:
    torch.manual_seed(args.seed)
    model, tokenizer = load_base(args.base_model, dtype, "cpu")
    lora_cfg = PersonalizedLoRAConfig(n_meta=args.n_meta, r=8, lora_alpha=16.0)
    lora = PersonalizedLoRA(model, lora_cfg)
    data, source = instances(args, model, tokenizer, lora_cfg)
    loss_fn = AnswerLoss(model)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    step_size = args.batch_size
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    steps = [order[i : i + step_size] for i in range(0, len(order), step_size)]
    lengths = data.lengths
    print(f"speed: {len(data)} instances ({statistics.mean(lengths):.0f} tokens on average, {min(lengths)}-"
          f"{max(lengths)}), {model.dtype}, {torch.get_num_threads()} threads, users from {source}; "
          f"a step = one micro-batch of {step_size} instances")

    took: dict[str, list[float]] = {k: [] for k in LOOPS}  # seconds per instance, step by step
    peaks = {k: 0.0 for k in LOOPS}
    lora.train()
    for i, rows in enumerate([steps[0]] + steps):  # the first is the warm-up of both loops
        for name, packing in (LOOPS.items() if i % 2 else reversed(LOOPS.items())):  # alternate who goes first
            cfg = LLMTrainConfig(batch_size=step_size, grad_accum=1, packing=packing)
            with RssPeak() as mem:
                start = time.perf_counter()
                accumulate_step(model, lora, loss_fn, data, rows, cfg, pad_id)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - start
            if i > 0:
                took[name].append(seconds / len(rows))
            peaks[name] = max(peaks[name], mem.peak)

    floor_flops = flops_per_instance(model.config, lora_cfg, lengths)
    row_tokens = int(statistics.mean(lengths) * step_size)
    rate = matmul_rate(model.config, model.dtype, row_tokens)
    floor = floor_flops / rate
    print(f"floor: {floor_flops / 1e9:.1f} GFLOP per instance (forward + backward) at {rate / 1e9:.0f} GFLOP/s "
          f"({model.dtype} matmuls of the model's shapes, {row_tokens} rows, measured now) = {floor:.3f} s "
          f"per instance")
    print(f"{'loop':<8} {'inst/s':>8} {'s/inst':>8} {'x floor':>8} {'best s/inst':>12} {'peak MB':>9}")
    for name in LOOPS:
        per = statistics.mean(took[name])
        print(f"{name:<8} {1 / per:>8.3f} {per:>8.3f} {per / floor:>8.2f} {min(took[name]):>12.3f} {peaks[name]:>9.0f}")
    paired = [b / a for a, b in zip(took["packed"], took["padded"])]  # the same rows, back to back
    ratio = statistics.mean(took["padded"]) / statistics.mean(took["packed"])
    print(f"packed / padded speed: {ratio:.2f}x overall, {statistics.median(paired):.2f}x median of {len(paired)} "
          f"paired steps (range {min(paired):.2f}-{max(paired):.2f}); peak MB: RSS growth over a step, sampled; "
          f"process RSS high-water {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    del model, lora, optimizer, loss_fn
    _trim()


def forms_speed(args, dtype: str) -> None:
    """Seconds per training instance of the per-target prompts and the shared form's requests,
    on the same samples, request by request in turns."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_base(args.base_model, dtype, "cpu")
    lora_cfg = PersonalizedLoRAConfig(n_meta=args.n_meta, r=8, lora_alpha=16.0)
    lora = PersonalizedLoRA(model, lora_cfg)
    data = PreparedData.load(args.data)
    embeddings = np.load(args.data / "embeddings.npy", allow_pickle=False)
    rows = anchored_requests(data.split("train"), args.instances, args.forms, args.seed)
    parts = request_slices(rows)
    reps = torch.randn(len(parts), lora_cfg.user_dim, generator=torch.Generator().manual_seed(args.seed))
    labels = rows["label"].tolist()
    builders = {form: LLMScorer(model, tokenizer, None, args.k_text, prompt_config_for(data.meta, form))
                for form in ("per_target", "shared")}
    per_target = TrainSet.build(builders["per_target"].prompts(data, rows, embeddings, "semantic"),
                                torch.cat([reps[i : i + 1].expand(p.stop - p.start, -1) for i, p in enumerate(parts)]),
                                labels, 1, 2, model.device)
    shared = TrainSet.build_requests(builders["shared"].request_prompts(data, rows, embeddings, "semantic"), reps,
                                     labels, 1, 2, model.device)
    loss_fn = AnswerLoss(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = LLMTrainConfig(batch_size=args.batch_size, grad_accum=1, packing=True)
    took = {"per-target": [], "shared": []}
    lora.train()
    for i, part in enumerate([parts[0]] + parts):  # the first request warms both up
        work = {"per-target": (per_target, list(range(part.start, part.stop))),
                "shared": (shared, [i - 1 if i else 0])}
        for name in (work if i % 2 else reversed(list(work))):
            units, chosen = work[name]
            start = time.perf_counter()
            accumulate_step(model, lora, loss_fn, units, chosen, cfg, pad_id)
            lora.zero_grad(set_to_none=True)
            if i > 0:
                took[name].append(time.perf_counter() - start)
    n = len(rows)
    tokens = {"per-target": sum(per_target.lengths) / n, "shared": sum(shared.lengths) / n}
    print(f"forms: {n} samples in {len(parts)} requests of up to {args.forms} (one view), {model.dtype}, "
          f"{torch.get_num_threads()} threads; forward and backward, the same samples in turns")
    print(f"{'form':<11} {'tokens/inst':>11} {'s/inst':>8} {'inst/s':>8}")
    for name in took:
        per = sum(took[name]) / n
        print(f"{name:<11} {tokens[name]:>11.0f} {per:>8.3f} {1 / per:>8.2f}")
    print(f"shared / per-target speed: {sum(took['per-target']) / sum(took['shared']):.2f}x "
          f"(tokens {tokens['per-target'] / tokens['shared']:.2f}x fewer)")


def loss_curves(args) -> None:
    """Both loops in float32 from the same LoRA, RNG state and data order: their per-step losses."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_base(args.base_model, "float32", "cpu")
    lora_cfg = PersonalizedLoRAConfig(n_meta=args.n_meta, r=8, lora_alpha=16.0)
    lora = PersonalizedLoRA(model, lora_cfg)
    initial = {k: v.clone() for k, v in lora.trainable_state_dict().items()}
    need = args.steps * args.curve_batch
    data, _ = instances(argparse.Namespace(**{**vars(args), "instances": need}), model, tokenizer, lora_cfg)
    loss_fn = AnswerLoss(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    curves: dict[str, list[float]] = {}
    for name, packing in LOOPS.items():
        lora.load_trainable_state_dict(initial)
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
        cfg = LLMTrainConfig(batch_size=args.curve_batch, grad_accum=1, packing=packing)
        torch.manual_seed(args.seed + 1)  # the gates' dropout draws the same masks in both loops
        lora.train()
        curves[name] = []
        for s in range(args.steps):
            rows = order[(s * args.curve_batch) % len(order) :][: args.curve_batch]
            total, _ = accumulate_step(model, lora, loss_fn, data, rows, cfg, pad_id)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curves[name].append(total / len(rows))
    diffs = [abs(a - b) for a, b in zip(curves["packed"], curves["padded"])]
    print(f"float32 loss curves: {args.steps} optimizer steps of {args.curve_batch} instances, same data order")
    print(f"{'step':>4} {'packed':>10} {'padded':>10} {'|diff|':>9}")
    for s, (a, b, e) in enumerate(zip(curves["packed"], curves["padded"], diffs), 1):
        print(f"{s:>4} {a:>10.5f} {b:>10.5f} {e:>9.2e}")
    print(f"max |diff| {max(diffs):.2e} (losses {min(min(v) for v in curves.values()):.3f}-"
          f"{max(max(v) for v in curves.values()):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "work" / "ml-100k", help="prepared dataset directory")
    parser.add_argument("--base-model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 where native, else float32), bfloat16, float32")
    parser.add_argument("--instances", type=int, default=64, help="timed instances per loop (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8, help="instances per micro-batch (and step) when timed")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of the float32 loss curves (0: none)")
    parser.add_argument("--curve-batch", type=int, default=2, help="instances per step of the loss curves")
    parser.add_argument("--k-text", type=int, default=10)
    parser.add_argument("--n-meta", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--forms", type=int, default=0, metavar="R",
                        help="time the two prompt forms instead, the shared one in requests of up to R samples")
    args = parser.parse_args()
    if args.instances < args.batch_size or args.batch_size < 1 or args.steps < 0 or args.curve_batch < 1:
        parser.error("need --instances >= --batch-size >= 1, --steps >= 0 and --curve-batch >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = str(resolve_dtype(args.dtype, "cpu")).removeprefix("torch.")
    start = time.perf_counter()
    if args.forms:
        forms_speed(args, dtype)
        print(f"total {time.perf_counter() - start:.0f} s wall time")
        return
    speed(args, dtype)
    if args.steps:
        loss_curves(args)
    print(f"total {time.perf_counter() - start:.0f} s wall time")


if __name__ == "__main__":
    main()
