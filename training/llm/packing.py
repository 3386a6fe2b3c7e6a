"""Packed, padding-free training batches: a micro-batch's prompts in one row, kept apart.

The instances of a micro-batch are concatenated into one row of tokens. Their positions restart
at 0 and attention runs per instance (``segment_attention``: causal SDPA over each instance's
slice of the row, registered with transformers' ``AttentionInterface``), so no token sees another
instance's. Every projection and MLP matmul runs once over the real tokens of the whole
micro-batch; nothing is computed for padding, causal attention skips its upper triangle instead
of multiplying a padded square and masking it, and grouped-query heads are not copied. The LoRA
reads the instances' users per segment (``PersonalizedLoRA.user(reps, segments=...)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "reclora_packed_sdpa"
# On CPUs torch's flash-attention kernel runs faster in float32 than in bfloat16 (forward and
# backward of 8 packed 300-token instances, SmolLM2's 9 query / 3 key-value heads of 64: 50-70 ms
# against 90-107 ms on an AVX512-BF16 Xeon) and is exact there, so a bfloat16 model's attention is
# computed in float32 on CPUs; the casts of q, k, v and the output cost a few percent of that.
CPU_ATTENTION_FLOAT32 = True


@dataclass(frozen=True)
class PackedBatch:
    """Instances concatenated into one row: ids and positions (1, T); ``bounds`` (n + 1,) are the
    cumulative lengths (``cu_seqlens``), so instance i holds tokens ``bounds[i]:bounds[i + 1]``."""

    ids: torch.Tensor
    positions: torch.Tensor
    bounds: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def last(self) -> torch.Tensor:
        """(n,) the index of each instance's last token (its answer position) in the row."""
        return self.bounds[1:] - 1

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[1])

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.ids.to(device), self.positions.to(device), self.bounds.to(device), self.lengths)


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
    return PackedBatch(torch.cat(list(sequences))[None], positions[None], bounds, lengths)


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
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("packed attention runs on one packed row with its instances' bounds (cu_seq_lens_q)")
    lengths = cu_seq_lens_q.diff().tolist()
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    if CPU_ATTENTION_FLOAT32 and query.device.type == "cpu" and dtype != torch.float32:
        query, key, value = query.float(), key.float(), value.float()
    # split, not sliced: the backward of n slices would zero-fill n full-length gradients
    parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                            enable_gqa=gqa).transpose(1, 2)
             for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
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
def packed_attention(model) -> Iterator[None]:
    """Run the model's attention per packed instance for the forwards inside (backward needs no
    switch). No mask is built: the name has no mask function, and the bounds make one needless."""
    register_packed_attention()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_answer_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """(n, hidden) final-layer hidden state (after the last norm) at each instance's last token."""
    with packed_attention(model):
        hidden = model.get_decoder()(input_ids=batch.ids, position_ids=batch.positions, cu_seq_lens_q=batch.bounds,
                                     cu_seq_lens_k=batch.bounds, max_length_q=max(batch.lengths),
                                     max_length_k=max(batch.lengths), use_cache=False).last_hidden_state
    return hidden[0, batch.last.long()]
