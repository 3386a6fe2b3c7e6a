"""Knowledge generation's tokens per second: the embedded generator against ``transformers``'
``generate`` (the loop it replaced), same model, prompts and greedy settings, in one run.

Real prompts: the first ``--items`` ML-100K item prompts and ``--users`` user prompts as
``reclora knowledge`` words them. Each batch size in ``--batch-sizes`` runs both loops over the
same prompts (alternating, so a busy machine slows both alike); the texts must be equal, and the
count of those that are not is printed. ``--threads`` pins torch's threads.

    python benchmarks/bench_knowledge.py --data work/ml-100k --base-model models/smollm2-135m-instruct \\
        --items 12 --users 4 --max-new-tokens 64 --batch-sizes 4 8 16 --threads 1

On a CPU that others share, one thread: two threads wait on each other whenever one is descheduled.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.knowledge.generate import batches, decode_batch, finish, prompt_ids  # noqa: E402
from service.knowledge.prompts import knowledge_prompts_for  # noqa: E402
from training.data.samples import PreparedData  # noqa: E402
from training.knowledge.build import cutoff_timestamp, item_prompts, user_prompts  # noqa: E402
from training.llm.loading import load_base  # noqa: E402


@torch.inference_mode()
def transformers_generate(model, tokenizer, ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                          repetition_penalty: float) -> list[list[int]]:
    """The baseline: one left-padded batch through ``model.generate`` (greedy, KV cache)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(e) for e in ids)
    tokens = torch.tensor([[pad_id] * (width - len(e)) + list(e) for e in ids])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in ids])
    out = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         repetition_penalty=repetition_penalty, pad_token_id=pad_id,
                         eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
    return out[:, width:].tolist()


def embedded(model, tokenizer, ids, *, max_new_tokens: int, repetition_penalty: float) -> list[list[int]]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return decode_batch(model, ids, eos_id=tokenizer.eos_token_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                        repetition_penalty=repetition_penalty)


def run(loop, model, tokenizer, ids, batch_size: int, **kwargs) -> tuple[list[str], int, float]:
    """(texts in prompt order, new tokens, seconds) of one loop over every prompt."""
    texts: list[str] = [""] * len(ids)
    tokens, start = 0, time.perf_counter()
    for idx in batches([len(e) for e in ids], batch_size):
        for i, row in zip(idx, loop(model, tokenizer, [ids[i] for i in idx], **kwargs)):
            generated = finish(tokenizer, row)
            texts[i], tokens = generated.text, tokens + generated.new_tokens
    return texts, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "work" / "ml-100k")
    parser.add_argument("--base-model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repetition-penalty", type=float, default=1.15)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = PreparedData.load(args.data)
    prompts = knowledge_prompts_for(data.meta)
    texts = (item_prompts(data, prompts)["prompt"].head(args.items).tolist()
             + user_prompts(data, prompts, cutoff_timestamp(data))["prompt"].head(args.users).tolist())
    model, tokenizer = load_base(args.base_model, args.dtype, "cpu")
    ids = prompt_ids(tokenizer, prompts.system_message(), texts)
    lengths = sorted(len(e) for e in ids)
    print(f"{len(ids)} prompts ({args.items} items, {args.users} users), prompt tokens "
          f"min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}; max new tokens "
          f"{args.max_new_tokens}, repetition penalty {args.repetition_penalty}, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    kwargs = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    run(embedded, model, tokenizer, ids[:2], 2, **{**kwargs, "max_new_tokens": 4})  # warm-up
    print(f"{'batch':>5} {'generate tok/s':>15} {'embedded tok/s':>15} {'speed-up':>9} {'tokens':>7} "
          f"{'texts differ':>13}")
    for batch_size in args.batch_sizes:
        before_texts, before_tokens, before_s = run(transformers_generate, model, tokenizer, ids, batch_size, **kwargs)
        after_texts, after_tokens, after_s = run(embedded, model, tokenizer, ids, batch_size, **kwargs)
        differ = sum(a != b for a, b in zip(before_texts, after_texts))
        before_rate, after_rate = before_tokens / before_s, after_tokens / after_s
        print(f"{batch_size:>5} {before_rate:>15.1f} {after_rate:>15.1f} {after_rate / before_rate:>8.2f}x "
              f"{after_tokens:>7} {differ:>10}/{len(ids)}", flush=True)


if __name__ == "__main__":
    main()
