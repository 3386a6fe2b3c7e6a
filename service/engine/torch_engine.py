"""The embedded scoring engine: one prefix forward, then all candidate suffixes on its KV cache.

A request's candidates share the prompt prefix (chat header, profile, instructions), so the prefix
is computed once and its keys/values are broadcast to every suffix row instead of recomputed.
Suffixes often share more: candidates whose retrieved histories begin with the same behaviours
have identical leading tokens. Those shared runs (at least ``min_shared`` tokens) are computed
once per group too, radix-tree style, and the groups' remainders are scored on the extended cache.
Only the answer position of each row is projected, onto the two label rows of the output
embedding, in float32 (bfloat16 logits would quantize the probabilities).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from service.engine.base import UserAdapter
from service.engine.lora_slot import LoRASlots
from service.llm.scoring import pad_right


class DeadlineExceeded(TimeoutError):
    """The engine stopped a forward because the request's deadline passed."""


class TorchEngine:
    def __init__(self, model, *, yes_id: int, no_id: int, pad_id: int, target_modules: list[str],
                 max_batch: int = 10, min_shared: int = 24) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.decoder = model.get_decoder()
        self.label_rows = model.get_output_embeddings().weight[[yes_id, no_id]].detach().float()
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.min_shared = min_shared
        self.slots = LoRASlots(model, target_modules)
        self._lock = threading.Lock()  # one forward at a time: the installed adapter is per forward
        self._deadline: float | None = None
        # Work of the last request: tokens run through the decoder and (query, key) pairs of
        # attention, padding included; benchmarks turn these into FLOPs.
        self.last_work = {"tokens": 0, "attention_pairs": 0}
        # A late request is abandoned between layers, so it does not hold the engine (and every
        # request queued behind it) for a forward whose answer nobody will read.
        for layer in self.decoder.layers:
            layer.register_forward_pre_hook(self._check_deadline)

    def _check_deadline(self, module, args) -> None:
        if self._deadline is not None and time.perf_counter() > self._deadline:
            raise DeadlineExceeded("the request deadline passed during the LLM forward")

    @torch.inference_mode()
    def score(self, adapter: UserAdapter | None, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
              deadline: float | None = None) -> np.ndarray:
        """P(Yes) per suffix; ``deadline`` is a ``time.perf_counter()`` instant after which the
        forward stops with DeadlineExceeded."""
        if not suffixes:
            return np.zeros(0, dtype=np.float32)
        if any(len(s) == 0 for s in suffixes):
            raise ValueError("every candidate suffix needs at least one token")
        with self._lock:
            if deadline is not None and time.perf_counter() > deadline:
                raise DeadlineExceeded("the request deadline passed while waiting for the engine")
            self._deadline = deadline
            self.last_work = {"tokens": 0, "attention_pairs": 0}
            self.slots.install(adapter)
            try:
                kv = self._extend(None, 0, prefix) if prefix else None  # once per request
                out = np.empty(len(suffixes), dtype=np.float32)
                self._score_group(kv, len(prefix), list(range(len(suffixes))), 0, suffixes, out)
                return out
            finally:
                self._deadline = None
                self.slots.install(None)

    def _extend(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None, p: int,
                tokens: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the context after appending ``tokens`` (batch of one)."""
        ids = torch.as_tensor([list(tokens)], dtype=torch.long, device=self.device)
        self._count(1, len(tokens), p)
        cache = DynamicCache(kv) if kv is not None else None
        positions = (p + torch.arange(len(tokens), device=self.device)).unsqueeze(0)
        out = self.decoder(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _count(self, rows: int, length: int, context: int) -> None:
        self.last_work["tokens"] += rows * length
        self.last_work["attention_pairs"] += rows * length * (context + (length + 1) / 2)

    def _score_group(self, kv, p: int, rows: list[int], offset: int, suffixes: Sequence[Sequence[int]],
                     out: np.ndarray) -> None:
        """Score ``rows`` (whose suffixes agree up to ``offset``) on the context ``kv`` of length p."""
        shared = _common_prefix(suffixes, rows, offset)
        if len(rows) > 1 and shared >= self.min_shared:
            kv = self._extend(kv, p, suffixes[rows[0]][offset : offset + shared])
            p, offset = p + shared, offset + shared
        groups: dict[int, list[int]] = {}
        for r in rows:
            groups.setdefault(suffixes[r][offset] if len(suffixes[r]) > offset + 1 else -1, []).append(r)
        leaves = []
        for key, members in groups.items():
            if key != -1 and len(members) > 1 and len(members) < len(rows) and \
                    _common_prefix(suffixes, members, offset) >= self.min_shared:
                self._score_group(kv, p, members, offset, suffixes, out)
            else:
                leaves += members
        # Similar lengths share a chunk, so right-padding wastes little work.
        leaves.sort(key=lambda r: len(suffixes[r]))
        for start in range(0, len(leaves), self.max_batch):
            chunk = leaves[start : start + self.max_batch]
            out[chunk] = self._score_chunk(kv, p, [suffixes[r][offset:] for r in chunk])

    def _score_chunk(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None, p: int,
                     suffixes: Sequence[Sequence[int]]) -> np.ndarray:
        n = len(suffixes)
        ids, mask, last = (t.to(self.device) for t in pad_right(suffixes, self.pad_id))
        self._count(n, ids.shape[1], p)
        if kv is not None:
            cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
            mask = torch.cat([torch.ones(n, p, dtype=mask.dtype, device=self.device), mask], 1)
        else:
            cache = None
        positions = (p + torch.arange(ids.shape[1], device=self.device)).unsqueeze(0).expand(n, -1)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=cache is not None).last_hidden_state
        h = hidden[torch.arange(n, device=self.device), last].float()
        logits = h @ self.label_rows.T
        return torch.sigmoid(logits[:, 0] - logits[:, 1]).cpu().numpy()


def _common_prefix(suffixes: Sequence[Sequence[int]], rows: list[int], offset: int) -> int:
    """Tokens after ``offset`` that every row shares, leaving each at least one token of its own."""
    first = suffixes[rows[0]]
    limit = min(len(suffixes[r]) for r in rows) - offset - 1
    n = 0
    while n < limit and all(suffixes[r][offset + n] == first[offset + n] for r in rows):
        n += 1
    return max(n, 0)
