"""Packed, padding-free training batches: a micro-batch's prompts in one row, kept apart.

The instances of a micro-batch are concatenated into one row of tokens. Their positions restart
at 0 and attention runs per instance (``segment_attention``: causal SDPA over each instance's
slice of the row, registered with transformers' ``AttentionInterface``), so no token sees another
instance's. Every projection and MLP matmul runs once over the real tokens of the whole
micro-batch; nothing is computed for padding, causal attention skips its upper triangle instead
of multiplying a padded square and masking it, and grouped-query heads are not copied. The LoRA
reads the instances' users per segment (``PersonalizedLoRA.user(reps, segments=...)``).

A segment may also be a whole request (``pack_requests``): its prefix, then each candidate's
suffix, positions of every suffix continuing from the prefix, each suffix attending to the prefix
and to itself only (the tree the gateway's engine runs with a KV cache), so a request's shared
prefix is computed once and every candidate's answer reads the same prefix states.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "reclora_packed_sdpa"
# On CPUs torch's flash-attention kernel runs faster in float32 than in bfloat16 (forward and
# backward of 8 packed 300-token instances, SmolLM2's 9 query / 3 key-value heads of 64: 50-70 ms
# against 90-107 ms on an AVX512-BF16 Xeon) and is exact there, so a bfloat16 model's attention is
# computed in float32 on CPUs; the casts of q, k, v and the output cost a few percent of that.
CPU_ATTENTION_FLOAT32 = True


Tree = tuple[int, tuple[int, ...]]  # a request segment: (prefix tokens, each suffix's tokens)


@dataclass(frozen=True)
class PackedBatch:
    """Segments concatenated into one row: ids and positions (1, T); ``bounds`` (n + 1,) are the
    cumulative lengths (``cu_seqlens``), so segment i holds tokens ``bounds[i]:bounds[i + 1]``.
    ``answers`` are the answer positions in the row, one per instance; ``trees`` say which
    segments are requests of several suffixes (None: one causal sequence)."""

    ids: torch.Tensor
    positions: torch.Tensor
    bounds: torch.Tensor
    lengths: tuple[int, ...]
    answers: torch.Tensor
    trees: tuple[Tree | None, ...]

    @property
    def last(self) -> torch.Tensor:
        """The index of each instance's answer position in the row: a sequence's last token, or
        each suffix's last token in a request."""
        return self.answers

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[1])

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.ids.to(device), self.positions.to(device), self.bounds.to(device), self.lengths,
                           self.answers.to(device), self.trees)


def pack(sequences: Sequence[torch.Tensor]) -> PackedBatch:
    """One row of the sequences' token ids (1-D long tensors, each non-empty)."""
    if not sequences:
        raise ValueError("nothing to pack: no sequences")
    lengths = tuple(int(s.numel()) for s in sequences)
    if min(lengths) < 1:
        raise ValueError("every packed sequence needs at least one token")
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    bounds[1:] = torch.cumsum(torch.tensor(lengths), 0)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return PackedBatch(torch.cat(list(sequences))[None], positions[None], bounds, lengths, bounds[1:] - 1,
                       (None,) * len(lengths))


def pack_requests(requests: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]]) -> PackedBatch:
    """One row of requests, each (prefix ids, [suffix ids, ...]): a segment per request, an answer
    per suffix. A request of one suffix is the plain sequence prefix + suffix."""
    if not requests:
        raise ValueError("nothing to pack: no requests")
    ids, positions, lengths, answers, trees = [], [], [], [], []
    offset = 0
    for prefix, suffixes in requests:
        if not suffixes or min(int(s.numel()) for s in suffixes) < 1:
            raise ValueError("every packed request needs at least one non-empty suffix")
        n_prefix = int(prefix.numel())
        sizes = tuple(int(s.numel()) for s in suffixes)
        ids += [prefix, *suffixes]
        positions += [torch.arange(n_prefix)] + [torch.arange(n_prefix, n_prefix + n) for n in sizes]
        ends = torch.cumsum(torch.tensor(sizes), 0)
        answers.append(offset + n_prefix + ends - 1)
        lengths.append(n_prefix + int(ends[-1]))
        trees.append((n_prefix, sizes) if len(sizes) > 1 else None)
        offset += lengths[-1]
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    bounds[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return PackedBatch(torch.cat(ids)[None], torch.cat(positions)[None], bounds, tuple(lengths),
                       torch.cat(answers), tuple(trees))


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tree: Tree, scaling: float | None,
                   dropout: float, gqa: bool) -> torch.Tensor:
    """Attention of one request (query (1, H, L, D), key and value (1, H_kv, L, D)); returns
    (1, L, H, D). The prefix attends causally to itself; the suffixes, padded to the longest and
    batched, attend to the prefix and causally to themselves. Padding repeats a suffix's last
    token: a padded query's row is dropped, and no real query sees a padded key (causal)."""
    prefix, sizes = tree
    longest, device = max(sizes), query.device
    q_prefix, _ = query.split([prefix, query.shape[2] - prefix], 2)
    k_prefix, _ = key.split([prefix, key.shape[2] - prefix], 2)
    v_prefix, _ = value.split([prefix, value.shape[2] - prefix], 2)
    lengths = torch.tensor(sizes, device=device)[:, None]
    starts = prefix + torch.cumsum(torch.tensor((0, *sizes[:-1]), device=device), 0)
    steps = torch.arange(longest, device=device)
    padded = starts[:, None] + torch.minimum(steps[None, :], lengths - 1)

    def gathered(x: torch.Tensor) -> torch.Tensor:  # (1, h, L, D) -> (m, h, longest, D)
        return x[0][:, padded].transpose(0, 1)

    m = len(sizes)
    keys = torch.cat([k_prefix.expand(m, -1, -1, -1), gathered(key)], 2)
    values = torch.cat([v_prefix.expand(m, -1, -1, -1), gathered(value)], 2)
    mask = torch.cat([torch.ones(longest, prefix, dtype=torch.bool, device=device),
                      torch.ones(longest, longest, dtype=torch.bool, device=device).tril()], 1)
    suffix_out = F.scaled_dot_product_attention(gathered(query), keys, values, attn_mask=mask, dropout_p=dropout,
                                                scale=scaling, enable_gqa=gqa)  # (m, H, longest, D)
    real = (torch.arange(m, device=device)[:, None] * longest + steps[None, :])[steps[None, :] < lengths]
    suffix_out = suffix_out.transpose(1, 2).reshape(m * longest, *suffix_out.shape[1:2], suffix_out.shape[-1])[real]
    parts = [suffix_out[None]]
    if prefix:
        parts.insert(0, F.scaled_dot_product_attention(q_prefix, k_prefix, v_prefix, dropout_p=dropout, is_causal=True,
                                                       scale=scaling, enable_gqa=gqa).transpose(1, 2))
    return torch.cat(parts, 1)


_trees: ContextVar[tuple[Tree | None, ...] | None] = ContextVar("packed_trees", default=None)


def token_budget_groups(rows: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """``rows`` in order, grouped so each group's tokens stay within ``budget`` (a longer instance
    is a group of its own)."""
    groups: list[list[int]] = []
    used = 0
    for row in rows:
        n = lengths[row]
        if groups and used + n <= budget:
            groups[-1].append(row)
            used += n
        else:
            groups.append([row])
            used = n
    return groups


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed instance: query (1, H, T, D), key and value
    (1, H_kv, T, D); returns (1, T, H, D) as transformers' attention functions do."""
    trees = _trees.get()
    if cu_seq_lens_q is None or query.shape[0] != 1 or trees is None:
        raise ValueError("packed attention runs inside packed_attention on one packed row with its segments' "
                         "bounds (cu_seq_lens_q)")
    lengths = cu_seq_lens_q.diff().tolist()
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    if CPU_ATTENTION_FLOAT32 and query.device.type == "cpu" and dtype != torch.float32:
        query, key, value = query.float(), key.float(), value.float()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: Tree | None) -> torch.Tensor:
        if tree is not None:
            return tree_attention(q, k, v, tree, scaling, dropout, gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                              enable_gqa=gqa).transpose(1, 2)

    # split, not sliced: the backward of n slices would zero-fill n full-length gradients
    parts = [attend(q, k, v, tree) for q, k, v, tree in
             zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), trees)]
    out = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1)  # one copy, (1, T, H, D)
    return out.to(dtype), None


_registered = False


def register_packed_attention() -> None:
    """Make ``segment_attention`` available to transformers models under ``PACKED_ATTENTION``."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, segment_attention)
        _registered = True


@contextmanager
def packed_attention(model, trees: tuple[Tree | None, ...]) -> Iterator[None]:
    """Run the model's attention per packed segment for the forwards inside (backward needs no
    switch), requests (``trees``) as trees. No mask is built for plain segments: the name has no
    mask function, and the bounds make one needless."""
    register_packed_attention()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    token = _trees.set(trees)
    try:
        yield
    finally:
        _trees.reset(token)
        config._attn_implementation = previous


def packed_answer_hidden(model, batch: PackedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(n, hidden) final-layer hidden state (after the last norm) at each instance's last token;
    ``inputs_embeds`` (1, T, hidden) in place of the ids' embeddings (collaborative tokens)."""
    inputs = {"input_ids": batch.ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    with packed_attention(model, batch.trees):
        hidden = model.get_decoder()(**inputs, position_ids=batch.positions, cu_seq_lens_q=batch.bounds,
                                     cu_seq_lens_k=batch.bounds, max_length_q=max(batch.lengths),
                                     max_length_k=max(batch.lengths), use_cache=False).last_hidden_state
    return hidden[0, batch.last.long()]
