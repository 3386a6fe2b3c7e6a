"""Greedy knowledge generation with vLLM's offline batch API, run in vLLM's own environment.

vLLM pins other versions than the project, so ``reclora knowledge --engine vllm`` runs this file
with vLLM's interpreter (``python -m training.knowledge.vllm_batch`` from a checkout, or by path):
it imports only vLLM and the standard library. The project side does everything else: it puts the
prompts in the chat template and tokenizes them, so both engines read the same token ids, and it
decodes the returned ids exactly as the embedded generator does.

Input: JSON lines ``{"key": int, "prompt_token_ids": [int, ...]}``. Output: one JSON line per
chunk of prompts, written (and flushed) as soon as the chunk is done, so the caller can keep its
texts while the rest is generated: ``{"keys": [...], "token_ids": [[...], ...], "seconds": float}``.
The stopping rules are the embedded generator's: greedy, ``max_tokens`` new tokens at most, the
end-of-sequence ids given (and no others: the model's generation config is not read), the same
repetition penalty over prompt and output tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--input", required=True, help="JSON lines of {key, prompt_token_ids}")
    parser.add_argument("--output", required=True, help="JSON lines of results, appended chunk by chunk")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--stop-token-ids", type=int, nargs="+", required=True)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk", type=int, default=256, help="prompts per generate call (and output line)")
    parser.add_argument("--engine-args", default="{}", help="JSON object of further vllm.LLM arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with open(args.input, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        open(args.output, "a").close()
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(r["prompt_token_ids"]) for r in rows) + args.max_tokens
    engine_args = {"enforce_eager": True, "max_model_len": longest, "generation_config": "vllm",
                   **json.loads(args.engine_args)}
    llm = LLM(model=args.model, tokenizer=args.model, dtype=args.dtype, seed=0, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
                            stop_token_ids=list(args.stop_token_ids), detokenize=False, skip_special_tokens=False)
    with open(args.output, "a", encoding="utf-8") as out:
        for start in range(0, len(rows), args.chunk):
            chunk = rows[start : start + args.chunk]
            began = time.perf_counter()
            results = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in chunk], params,
                                   use_tqdm=False)
            line = {"keys": [r["key"] for r in chunk],
                    "token_ids": [list(result.outputs[0].token_ids) for result in results],
                    "seconds": time.perf_counter() - began}
            out.write(json.dumps(line) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
