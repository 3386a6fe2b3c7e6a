"""Batched greedy generation of knowledge texts with the base LLM (no LoRA).

Used offline (``reclora knowledge``: every item and user) and nearline (one user's refresh on
the engine thread). Prompts are put in the model's chat template and tokenized once
(``prompt_ids``: the ids ``reclora knowledge --engine vllm`` hands to vLLM too), sorted by length
and decoded in left-padded batches with one KV cache per batch (``decode_batch``): greedy, so the
same prompt always gives the same text, and rows leave the batch as they finish. ``finish`` turns
ids into text the same way for both engines. A nearline job passes ``interrupted``: generation
stops between decode steps when a request waits, and raises ``ForwardInterrupted`` so the
scheduler queues the job again.
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


def batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in order of length, in batches: similar lengths share a batch, so little padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def prompt_ids(tokenizer, system: str, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids of ``prompts`` in the chat template: what every engine generates from."""
    return [tokenizer.encode(chat_text(tokenizer, system, p), add_special_tokens=False) for p in prompts]


def finish(tokenizer, token_ids: Sequence[int]) -> Generated:
    """A generated id sequence as text: up to the first end-of-sequence id, special tokens dropped."""
    ids = list(token_ids)
    n = next((i for i, t in enumerate(ids) if t == tokenizer.eos_token_id), len(ids))
    return Generated(tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), n)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty (CTRL's, as ``transformers`` and vLLM apply it) on tokens already seen."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


@torch.inference_mode()
def decode_batch(model, ids: Sequence[Sequence[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
                 repetition_penalty: float = 1.0,
                 interrupted: Callable[[], bool] | None = None) -> list[list[int]]:
    """Greedy continuations of token id sequences, decoded together with one KV cache.

    Left padding; a row leaves the batch (and its cache) once it has produced ``eos_id``, so
    finished rows cost nothing; logits only at the last position. The penalty reads each row's
    own tokens (prompt and output, never padding), as vLLM does, so a row's text does not depend
    on the rows beside it. Returns each row's new ids, ending with ``eos_id`` where it stopped."""
    from transformers import DynamicCache

    device = model.device
    width = max(len(row) for row in ids)
    tokens = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in ids], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = torch.zeros(len(ids), model.config.vocab_size, dtype=torch.bool, device=device)
    for r, row in enumerate(ids):
        seen[r, torch.tensor(list(row), device=device)] = True
    cache = DynamicCache()
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    rows = torch.arange(len(ids), device=device)  # which input row each batch row is
    next_position = positions[:, -1] + 1
    generated: list[list[int]] = [[] for _ in ids]
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if repetition_penalty != 1.0:
            logits = _penalize(logits, seen, repetition_penalty)
        chosen = logits.argmax(-1)
        for r, token in zip(rows.tolist(), chosen.tolist()):
            generated[r].append(token)
        alive = chosen != eos_id
        if step == max_new_tokens - 1 or not bool(alive.any()):
            break
        if interrupted is not None and interrupted():
            raise ForwardInterrupted("knowledge generation yielded to a request")
        if not bool(alive.all()):
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, mask, seen = rows[keep], mask[keep], seen[keep]
            chosen, next_position = chosen[keep], next_position[keep]
        seen[torch.arange(len(rows), device=device), chosen] = True
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_position[:, None],
                    past_key_values=cache, use_cache=True)
        next_position = next_position + 1
    return generated


def generate_greedy(model, tokenizer, prompts: Sequence[str], *, system: str, max_new_tokens: int,
                    batch_size: int = 16, repetition_penalty: float = 1.0, interrupted: Callable[[], bool] | None = None,
                    on_batch: Callable[[list[int], list[Generated]], None] | None = None) -> list[Generated]:
    """Greedy answers to ``prompts`` (user messages under ``system``), in the prompts' order.

    ``repetition_penalty`` above 1 discourages the loops small models fall into (still greedy:
    the same prompt gives the same text). ``on_batch(indices, results)`` is called after each
    batch (progress, checkpointing)."""
    ids = prompt_ids(tokenizer, system, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[Generated | None] = [None] * len(ids)
    for idx in batches([len(row) for row in ids], batch_size):
        new = decode_batch(model, [ids[i] for i in idx], eos_id=tokenizer.eos_token_id, pad_id=pad_id,
                           max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                           interrupted=interrupted)
        done = [finish(tokenizer, row) for row in new]
        for i, g in zip(idx, done):
            results[i] = g
        if on_batch is not None:
            on_batch(idx, done)
    return [r for r in results if r is not None]
