"""Benchmark of POST /v1/score on ML-100K histories in Redis, against the naive way and the floor.

(a) end-to-end latency over real HTTP (p50/p99) with the per-stage breakdown, and the gateway
    overhead (end to end minus the engine) for a user with 1000 history items;
(b) the same prompts scored the naive way in the same run: transformers + peft, one
    ``set_adapter`` per request, every candidate a full left-padded prompt, logits at every
    position; the speed ratio and the largest score difference (below float32 also against the
    naive way in float32, whose scores are exact where the other's logits are rounded, with the
    distribution of the differences and how often a pair of candidates is ranked as the exact
    scores rank it); and the same engine on torch's kernels instead of its native ones (on
    CPUs), time and scores;
(a') the LLM stage through the gateway against the same engine in this process on the same
    prompts, request by request in turn (the gateway's ``timings.llm``, then ``TorchEngine.score``
    here with the same thread count), and the largest difference between their LLM scores;
(c) the floor: the FLOPs the engine must do divided by a matmul rate measured in the same run,
    in the dtype the engine computes in (float32 on CPUs without native bfloat16, where
    emulated bfloat16 is far slower; the bfloat16 rate is printed too), and the engine's time
    over it. Also peak memory of the gateway and this process.

Every request asks for candidates its user has not been scored for, so the LLM score cache (on by
default) answers none of them; the gateway and this process read histories with the same
settings (``RECLORA_REDIS_URL``, ``RECLORA_REDIS_PREFIX``, ... from the environment). Prompt tokens
per request (shared prefix, all suffixes) are printed with the rest.

Run: python benchmarks/bench_score.py --version reclora-ml100k-v1 [--store DIR] (histories loaded
with `reclora load-histories`); it starts its own gateway on --port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gateway_support  # noqa: E402
from gateway_support import peak_rss_mb  # noqa: E402
from service.config import Settings  # noqa: E402
from service.engine.base import UserAdapter  # noqa: E402
from service.engine.ragged import context_length  # noqa: E402
from service.history import Event, HistoryStore  # noqa: E402
from service.llm.precision import resolve_dtype  # noqa: E402
from service.api.wiring import build_torch_engine  # noqa: E402
from service.model import load_model  # noqa: E402
from service.scoring.stages import Prompts, UserHistoryView, build_adapter, run_crm, text_inputs  # noqa: E402

LONG_USER = "bench-long-history"


class RequestInputs(NamedTuple):
    adapter: UserAdapter
    prompts: Prompts


def request_inputs(model, builder, user: str, candidates: list[int], stored) -> RequestInputs:
    """A request's adapter and prompts from its stored history, by the gateway's scoring steps."""
    view = UserHistoryView.from_raw(model, stored.items, stored.ratings, stored.profile)
    dense = model.catalog.to_dense(candidates)
    crm = run_crm(model, view, dense)
    return RequestInputs(build_adapter(model, user, model.mixer.mixtures(crm.user_rep)),
                         text_inputs(builder, model, view, dense))


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def start_gateway(args) -> subprocess.Popen:
    return gateway_support.start_gateway(args.port, args.log, dict(
        active_version=args.version, model_store=args.store, base_model_dir=args.base_model,
        default_deadline_ms=30000, max_deadline_ms=60000, log_level="WARNING", torch_threads=args.threads,
        torch_dtype=args.dtype), ready_timeout_s=180)


async def seed_long_user(settings: Settings, catalog_items: np.ndarray, n: int, rng) -> None:
    store = HistoryStore.from_settings(settings.history)
    await store.delete(LONG_USER)
    items = rng.choice(catalog_items, size=n, replace=False)
    ratings = rng.integers(1, 6, size=n)
    await store.append(LONG_USER, [Event(int(i), float(r), 880_000_000 + k) for k, (i, r) in enumerate(zip(items, ratings))])
    await store.set_profile(LONG_USER, {"gender": "female", "age": "25-34", "occupation": "writer"})
    await store.aclose()


def matmul_rate(hidden: int, inter: int, tokens: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of matmuls in ``dtype`` at the model's shapes (attention and MLP projections)."""
    x = torch.randn(tokens, hidden, dtype=dtype)
    shapes = [(hidden, hidden), (hidden, inter), (inter, hidden)]
    weights = [torch.randn(a, b, dtype=dtype) for a, b in shapes]
    xi = torch.randn(tokens, inter, dtype=dtype)
    for _ in range(2):
        x @ weights[0], x @ weights[1], xi @ weights[2]
    start = time.perf_counter()
    for _ in range(repeats):
        x @ weights[0]
        x @ weights[1]
        xi @ weights[2]
    seconds = time.perf_counter() - start
    flops = repeats * 2 * tokens * (hidden * hidden + 2 * hidden * inter)
    return flops / seconds / 1e9


class WorkCounter:
    """The work of the engine's packed forwards (``TorchEngine.observe_rows``): tokens run through
    the decoder, (query, key) pairs of causal attention per layer, and the queries the last layer
    computes (answer positions only)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.work = {"tokens": 0, "attention_pairs": 0, "final_queries": 0, "final_attention_pairs": 0}

    def __call__(self, rows) -> None:
        for row in rows:
            n, p = len(row.tokens), context_length(row.context)
            self.work["tokens"] += n
            self.work["attention_pairs"] += n * (p + (n + 1) / 2)
            if not row.extend:
                self.work["final_queries"] += 1
                self.work["final_attention_pairs"] += p + n


def engine_flops(config, lora_rank: int, work: dict) -> float:
    """Matmul + attention FLOPs of the work the engine reports for a request.

    The last layer needs keys and values at every token but queries, attention output, o_proj and
    the MLP only at the answer positions, which is all the engine computes there.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    keys_values = 2 * (2 * h * kv + lora_rank * (h + kv))  # k, v (with v's LoRA)
    rest = 2 * (2 * h * h + 3 * h * inter + lora_rank * 2 * h)  # q (with its LoRA), o, MLP
    matmuls = ((layers - 1) * (keys_values + rest) + keys_values) * work["tokens"] + rest * work["final_queries"]
    attention = 2 * 2 * h * ((layers - 1) * work["attention_pairs"] + work["final_attention_pairs"])  # q.k, p.v
    return matmuls + attention


def naive_scores(peft_model, tokenizer, prompts: list[list[int]], adapter_name: str, yes: int, no: int) -> np.ndarray:
    peft_model.set_adapter(adapter_name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: the answer position is the last column
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    with torch.inference_mode():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits  # every position, full vocabulary
        last = logits[:, -1, [yes, no]].float()
    return torch.softmax(last, -1)[:, 0].numpy()


def error_summary(scores: list[np.ndarray], exact: list[np.ndarray]) -> dict:
    """How far ``scores`` are from the exact ones: the absolute differences' mean, p99 and max, the
    share of candidate pairs (within a request) that the two rank the same way, and how far apart
    the exact scores of the pairs ranked otherwise were (a near tie flips on any rounding)."""
    diff = np.abs(np.concatenate(scores) - np.concatenate(exact))
    same, pairs, flipped_gaps, gaps = 0, 0, [], []
    for got, ref in zip(scores, exact):
        i, j = np.triu_indices(len(ref), 1)
        agree = np.sign(got[i] - got[j]) == np.sign(ref[i] - ref[j])
        same += int(agree.sum())
        pairs += len(i)
        gap = np.abs(ref[i] - ref[j])
        gaps.append(gap)
        flipped_gaps.append(gap[~agree])
    gaps, flipped = np.concatenate(gaps), np.concatenate(flipped_gaps)
    return {"mean": float(diff.mean()), "p99": percentile(diff, 99), "max": float(diff.max()),
            "pairs_ranked_as_exact": same / max(pairs, 1),
            "misranked_pairs_exact_gap_p50": percentile(flipped, 50) if len(flipped) else 0.0,
            "misranked_pairs_exact_gap_max": float(flipped.max()) if len(flipped) else 0.0,
            "pairs_within_0.005_exact": float((gaps < 0.005).mean()) if len(gaps) else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", default="reclora-ml100k-v1")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--base-model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    ap.add_argument("--port", type=int, default=8021)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--long-history", type=int, default=1000)
    ap.add_argument("--long-repeats", type=int, default=7,
                    help="more requests of the long-history user (new candidates each), for its overhead p50")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="the engine's dtype, in the gateway and here (the naive way runs in the same one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=str(ROOT / "work" / "bench-gateway.log"))
    ap.add_argument("--out", type=Path, default=ROOT / "work" / "bench-score.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    settings = Settings(active_version=args.version, model_store=args.store, base_model_dir=args.base_model,
                        torch_dtype=args.dtype)
    model = load_model(args.store / args.version)
    items = model.catalog.items["item"].to_numpy()
    asyncio.run(seed_long_user(settings, items, args.long_history, rng))
    users = [LONG_USER] + [str(u) for u in rng.choice(np.arange(1, 944), size=args.requests, replace=False)]
    warm_user, users = users[-1], users[:-1]
    # Every request asks for candidates its user was never scored for (the long-history user's come
    # from one permutation of the catalog), so the LLM score cache answers none of them and every
    # answer runs its LLM stage.
    fresh = iter(rng.permutation(items))
    requests = [(u, [int(next(fresh)) if u == LONG_USER else int(i) for i in rng.choice(items, size=args.candidates,
                                                                                         replace=False)])
                for u in users]

    # The engine in this process and every request's inputs, built as the gateway builds them
    # from the same stored histories (nothing appends to them meanwhile).
    engine, builder = build_torch_engine(settings, model)
    store = HistoryStore.from_settings(settings.history)

    async def read_all():
        out = [await store.read(u) for u, _ in requests]
        await store.aclose()
        return out

    inputs = [request_inputs(model, builder, user, cands, stored)
              for (user, cands), stored in zip(requests, asyncio.run(read_all()))]
    warm_inputs = inputs[-1]
    engine.score(warm_inputs.adapter, warm_inputs.prompts.prefix, warm_inputs.prompts.suffixes)  # warm-up

    # (a) end to end over real HTTP; (a') each request's LLM stage against the same prompts here
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    gateway = start_gateway(args)
    e2e, stages, answers, here_ms, here_diff = [], [], [], [], 0.0
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=120) as client:
            warm = [int(i) for i in rng.choice(items, size=args.candidates, replace=False)]
            client.post("/v1/score", json={"user_id": warm_user, "candidates": warm, "deadline_ms": 60000})  # warm-up
            for (user, cands), inp in zip(requests, inputs):
                start = time.perf_counter()
                r = client.post("/v1/score", json={"user_id": user, "candidates": cands, "deadline_ms": 60000})
                e2e.append((time.perf_counter() - start) * 1000)
                body = r.json()
                assert r.status_code == 200 and not body["degraded"], body
                stages.append(body["timings"])
                answers.append(body)
                time.sleep(0.05)  # the gateway's idle OpenMP workers stop spinning before the engine here runs
                start = time.perf_counter()
                here = engine.score(inp.adapter, inp.prompts.prefix, inp.prompts.suffixes)
                here_ms.append((time.perf_counter() - start) * 1000)
                gateway_llm = np.asarray([c["llm_score"] for c in body["scores"]], dtype=np.float64)
                here_diff = max(here_diff, float(np.abs(gateway_llm - here).max()))
            long_overheads = [e2e[0] - stages[0]["llm"]]  # its first request: cold adapter cache
            for _ in range(args.long_repeats):
                cands = [int(next(fresh)) for _ in range(args.candidates)]
                start = time.perf_counter()
                r = client.post("/v1/score", json={"user_id": LONG_USER, "candidates": cands, "deadline_ms": 60000})
                body = r.json()
                assert r.status_code == 200 and not body["degraded"], body
                long_overheads.append((time.perf_counter() - start) * 1000 - body["timings"]["llm"])
        gateway_peak = peak_rss_mb(gateway.pid)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)

    # (b) the same prompts: the engine in-process, and the naive way
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(args.dtype, "cpu")  # the naive way runs in the engine's dtype: a like-for-like comparison
    base = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dtype)
    peft_model = None
    # Below float32 the naive way's own scores are rounded too (its logits come out in the model's
    # dtype), so the engine is also compared with the naive way in float32: the exact scores.
    exact_base = None if dtype == torch.float32 else AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32)
    exact_model, max_diff_exact = None, 0.0
    engine_ms, naive_ms, max_diff, flops, tmp = [], [], 0.0, [], Path(tempfile.mkdtemp())
    engine_tokens, naive_tokens, prompt_tokens, counter = [], [], [], WorkCounter()
    kernel, torch_kernels_ms, max_diff_torch_kernels = engine.ragged.kernel, [], 0.0
    scored = {"engine": [], "naive": [], "exact": []}  # per request, for the error distribution
    for k, inp in enumerate(inputs):
        adapter: UserAdapter = inp.adapter
        prefix, suffixes = inp.prompts.prefix, inp.prompts.suffixes
        prompt_tokens.append((len(prefix), sum(len(s) for s in suffixes)))
        counter.reset()
        engine.observe_rows = counter
        start = time.perf_counter()
        fast = engine.score(adapter, prefix, suffixes)
        engine_ms.append((time.perf_counter() - start) * 1000)
        engine.observe_rows = None
        if kernel is not None:  # the same engine on torch's kernels instead of the native ones
            engine.ragged.kernel = None
            start = time.perf_counter()
            torch_kernels = engine.score(adapter, prefix, suffixes)
            torch_kernels_ms.append((time.perf_counter() - start) * 1000)
            engine.ragged.kernel = kernel
            max_diff_torch_kernels = max(max_diff_torch_kernels, float(np.abs(fast - torch_kernels).max()))
        flops.append(engine_flops(base.config, model.lora_config.r, counter.work))
        naive_tokens.append(len(suffixes) * max(len(prefix) + len(s) for s in suffixes))
        engine_tokens.append(counter.work["tokens"])
        # the naive way: a PEFT adapter per user on disk, loaded once, then set_adapter per request
        from safetensors.torch import save_file

        from service.llm.personalized_lora import peft_weights

        adir = tmp / f"a{k}"
        adir.mkdir()
        save_file(peft_weights(adapter.weights), adir / "adapter_model.safetensors")
        cfg = json.loads((args.store / args.version / "lora" / "config.json").read_text())
        (adir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
            "lora_dropout": 0.0, "target_modules": cfg["target_modules"], "bias": "none",
            "base_model_name_or_path": str(args.base_model)}))
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base, adir, adapter_name=f"u{k}").eval()
        else:
            peft_model.load_adapter(adir, adapter_name=f"u{k}")
        start = time.perf_counter()
        slow = naive_scores(peft_model, builder.tokenizer, [prefix + s for s in suffixes], f"u{k}", builder.yes_id, builder.no_id)
        naive_ms.append((time.perf_counter() - start) * 1000)
        max_diff = max(max_diff, float(np.abs(fast - slow).max()))
        scored["engine"].append(fast)
        scored["naive"].append(slow)
        if exact_base is not None:
            if exact_model is None:
                exact_model = PeftModel.from_pretrained(exact_base, adir, adapter_name=f"u{k}").eval()
            else:
                exact_model.load_adapter(adir, adapter_name=f"u{k}")
            exact = naive_scores(exact_model, builder.tokenizer, [prefix + s for s in suffixes], f"u{k}",
                                 builder.yes_id, builder.no_id)
            max_diff_exact = max(max_diff_exact, float(np.abs(fast - exact).max()))
            scored["exact"].append(exact)

    shape = (base.config.hidden_size, base.config.intermediate_size, 2048)
    rate = matmul_rate(*shape, dtype)  # the floor uses the rate of the dtype the engine computes in
    bf16_rate = matmul_rate(*shape, torch.bfloat16, repeats=1)
    floor_ms = [f / (rate * 1e9) * 1000 for f in flops]
    overhead = [t - s["llm"] for t, s in zip(e2e, stages)]
    report = {
        "requests": len(requests), "candidates": args.candidates, "k_text": model.k_text, "threads": args.threads,
        "e2e_ms": {"p50": percentile(e2e, 50), "p99": percentile(e2e, 99)},
        "stages_ms_p50": {k: percentile([s[k] for s in stages], 50) for k in stages[0]},
        "llm_stage_ms_p50": {"gateway": percentile([s["llm"] for s in stages], 50),
                             "in_process": percentile(here_ms, 50),
                             "gateway_over_in_process": percentile([s["llm"] / h for s, h in zip(stages, here_ms)], 50),
                             "max_llm_score_diff": here_diff},
        "gateway_overhead_ms": {"p50": percentile(overhead, 50), "long_history_len": args.long_history,
                                "long_history_user_p50": percentile(long_overheads, 50),
                                "long_history_user_first": long_overheads[0],
                                "long_history_user_requests": len(long_overheads)},
        "tokens_p50": {"engine": percentile(engine_tokens, 50), "naive_padded": percentile(naive_tokens, 50)},
        "prompt_tokens_per_request_p50": {"prefix": percentile([p for p, _ in prompt_tokens], 50),
                                          "suffixes": percentile([s for _, s in prompt_tokens], 50)},
        "engine_ms_p50": percentile(engine_ms, 50), "naive_ms_p50": percentile(naive_ms, 50),
        "native_kernels": kernel is not None,
        "engine_torch_kernels_ms_p50": percentile(torch_kernels_ms, 50) if torch_kernels_ms else None,
        "max_score_diff_native_vs_torch_kernels": max_diff_torch_kernels if torch_kernels_ms else None,
        "speedup_vs_naive": percentile(naive_ms, 50) / percentile(engine_ms, 50),
        "max_score_diff_vs_naive": max_diff,
        "max_score_diff_vs_naive_float32": max_diff_exact if exact_base is not None else max_diff,
        "vs_exact": {way: error_summary(scored[way], scored["exact"] or scored["naive"])
                     for way in ("engine", "naive")},
        "engine_dtype": str(dtype), "matmul_gflops_engine_dtype": rate, "matmul_gflops_bf16": bf16_rate,
        "engine_gflop_p50": percentile(flops, 50) / 1e9,
        "floor_ms_p50": percentile(floor_ms, 50),
        "engine_over_floor": percentile([e / f for e, f in zip(engine_ms, floor_ms)], 50),
        "peak_rss_mb": {"gateway": gateway_peak,
                        "benchmark_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
