"""Batched greedy generation of knowledge texts with the base LLM (no LoRA).

Used offline (``reclora knowledge``: every item and user) and nearline (one user's refresh on
the engine thread). Prompts are put in the model's chat template, sorted by length and decoded
in left-padded batches with the model's KV cache (``transformers``' ``generate``: a well-kept
loop; greedy, so the same prompt always gives the same text). A nearline job passes
``interrupted``: generation stops between decode steps when a request waits, and raises
``ForwardInterrupted`` so the scheduler queues the job again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from service.engine.base import ForwardInterrupted


@dataclass(frozen=True)
class Generated:
    text: str
    new_tokens: int


def chat_text(tokenizer, system: str, prompt: str) -> str:
    """The prompt as the model's chat turn, ready for the assistant's answer."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\nUSER: {prompt}\nASSISTANT:"


class _StopWhen:
    """A stopping criterion that ends generation as soon as ``interrupted()`` turns true."""

    def __init__(self, interrupted: Callable[[], bool]) -> None:
        self.interrupted = interrupted
        self.fired = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.fired = self.fired or bool(self.interrupted())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


def batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in order of length, in batches: similar lengths share a batch, so little padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.inference_mode()
def generate_batch(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
                   repetition_penalty: float = 1.0,
                   interrupted: Callable[[], bool] | None = None) -> list[Generated]:
    """Greedy continuations of chat-formatted ``texts`` (one left-padded batch)."""
    from transformers import StoppingCriteriaList

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in enc], device=model.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=model.device)
    stop = _StopWhen(interrupted) if interrupted is not None else None
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         repetition_penalty=repetition_penalty, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                         stopping_criteria=StoppingCriteriaList([stop]) if stop else None,
                         temperature=None, top_p=None, top_k=None)
    if stop is not None and stop.fired:
        raise ForwardInterrupted("knowledge generation yielded to a request")
    results = []
    for row in out[:, width:].tolist():
        n = next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
        results.append(Generated(tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n))
    return results


def generate_greedy(model, tokenizer, prompts: Sequence[str], *, system: str, max_new_tokens: int,
                    batch_size: int = 16, repetition_penalty: float = 1.0, interrupted: Callable[[], bool] | None = None,
                    on_batch: Callable[[list[int], list[Generated]], None] | None = None) -> list[Generated]:
    """Greedy answers to ``prompts`` (user messages under ``system``), in the prompts' order.

    ``repetition_penalty`` above 1 discourages the loops small models fall into (still greedy:
    the same prompt gives the same text). ``on_batch(indices, results)`` is called after each
    batch (progress, checkpointing)."""
    texts = [chat_text(tokenizer, system, p) for p in prompts]
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    results: list[Generated | None] = [None] * len(texts)
    for idx in batches(lengths, batch_size):
        done = generate_batch(model, tokenizer, [texts[i] for i in idx], max_new_tokens=max_new_tokens,
                              repetition_penalty=repetition_penalty, interrupted=interrupted)
        for i, g in zip(idx, done):
            results[i] = g
        if on_batch is not None:
            on_batch(idx, done)
    return [r for r in results if r is not None]
