"""P("Yes") from a causal LM: label logits in float32 from the final hidden state.

Only the answer position is projected, and only onto the two label rows of the output
embedding, in float32: bfloat16 logits of magnitude 16 to 32 are spaced 0.125 apart, which
would quantize probabilities and tie nearby candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from training.llm.packing import pack_requests, packed_answer_hidden, token_budget_groups


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, index of each sequence's last token)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask, mask.sum(1) - 1


def answer_hidden(model, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor,
                  inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(B, hidden) final-layer hidden state (after the last norm) at each sequence's last token;
    ``inputs_embeds`` (B, T, hidden) in place of the ids' embeddings (collaborative tokens)."""
    inputs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    hidden = model.get_decoder()(**inputs, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(len(ids)), last]


def label_logits(model, hidden: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """(B, len(label_ids)) float32 logits of the label tokens."""
    weight = model.get_output_embeddings().weight[list(label_ids)].float()
    return hidden.float() @ weight.T


def yes_probability(logits: torch.Tensor) -> torch.Tensor:
    """softmax over [yes, no] logits -> P(yes) = sigmoid(yes - no)."""
    return torch.sigmoid(logits[:, 0] - logits[:, 1])


@torch.no_grad()
def score_sequences(model, sequences: Sequence[Sequence[int]], yes_id: int, no_id: int, pad_id: int,
                    batch_size: int = 16,
                    rows_context: Callable[[list[int]], AbstractContextManager] | None = None,
                    embeds: Callable[[list[int], torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """P(yes) for full prompts (prefix + suffix ids), batched and right-padded.

    ``rows_context(indices)`` is entered around each batch, e.g. to install those rows' users;
    ``embeds(indices, ids, mask)`` gives a batch's input embeddings (collaborative tokens).
    """
    out = []
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask, last = (t.to(model.device) for t in pad_right([sequences[i] for i in chunk], pad_id))
        with rows_context(chunk) if rows_context else nullcontext():
            inputs_embeds = None if embeds is None else embeds(chunk, ids, mask)
            hidden = answer_hidden(model, ids, mask, last, inputs_embeds)
            out.append(yes_probability(label_logits(model, hidden, [yes_id, no_id])))
    probs = torch.empty(len(sequences))
    probs[torch.as_tensor(order)] = torch.cat(out).cpu() if out else torch.empty(0)
    return probs


@torch.no_grad()
def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], yes_id: int, no_id: int,
                   token_budget: int = 8192,
                   rows_context: Callable[[list[int], tuple[int, ...]], AbstractContextManager] | None = None,
                   embeds: Callable[[list[int], torch.Tensor, None], torch.Tensor] | None = None) -> torch.Tensor:
    """P(yes) of every suffix of requests (prefix ids, [suffix ids, ...]), in order: packed rows
    of whole requests up to ``token_budget`` tokens, each request's prefix computed once and read
    by its suffixes as the gateway's engine reads its KV cache.

    ``rows_context(requests, segments)`` is entered around each forward, e.g. to install those
    requests' users on the packed row's segments; ``embeds(requests, ids, None)`` gives the packed
    row's input embeddings (collaborative tokens).
    """
    lengths = [len(p) + sum(len(s) for s in suffixes) for p, suffixes in requests]
    out = []
    for rows in token_budget_groups(range(len(requests)), lengths, token_budget):
        batch = pack_requests([(torch.as_tensor(requests[i][0], dtype=torch.long),
                                [torch.as_tensor(s, dtype=torch.long) for s in requests[i][1]]) for i in rows])
        batch = batch.to(model.device)
        with rows_context(rows, batch.lengths) if rows_context else nullcontext():
            inputs_embeds = None if embeds is None else embeds(list(rows), batch.ids, None)
            hidden = packed_answer_hidden(model, batch, inputs_embeds)
            out.append(yes_probability(label_logits(model, hidden, [yes_id, no_id])))
    return torch.cat(out).cpu() if out else torch.empty(0)
