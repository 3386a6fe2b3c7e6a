"""The embedded scoring engine: one prefix forward, then all candidate suffixes on its KV cache.

A request's candidates share the prompt prefix (chat header, profile, instructions), so the prefix
is computed once and its keys/values are broadcast to every suffix row instead of recomputed.
Suffixes often share more: candidates whose retrieved histories begin with the same behaviours
have identical leading tokens. Those shared runs are computed once per group too, radix-tree
style, where that saves enough work, and the groups' remainders are scored on the extended cache.
The suffixes run packed, without padding (``RaggedDecoder``), and only the answer position of
each row is projected, onto the two label rows of the output embedding, in float32 (bfloat16
logits would quantize the probabilities).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from service.engine.base import UserAdapter
from service.engine.lora_slot import LoRASlots
from service.engine.ragged import KV, RaggedDecoder


class DeadlineExceeded(TimeoutError):
    """The engine stopped a forward because the request's deadline passed."""


class TorchEngine:
    def __init__(self, model, *, yes_id: int, no_id: int, target_modules: list[str],
                 max_batch: int = 32, min_saving: int = 48) -> None:
        self.model = model.eval()
        self.ragged = RaggedDecoder(model)
        self.label_rows = model.get_output_embeddings().weight[[yes_id, no_id]].detach().float()
        self.max_batch = max_batch
        self.min_saving = min_saving
        self.slots = LoRASlots(model, target_modules)
        self._lock = threading.Lock()  # one forward at a time: the installed adapter is per forward
        self._deadline: float | None = None
        # Work of the last request, which benchmarks turn into FLOPs: tokens run through the
        # decoder, (query, key) pairs of causal attention per layer, and the queries the last
        # layer computes (answer positions only).
        self.last_work = _no_work()
        # Recent milliseconds per prompt token (prefix + suffixes, as a caller counts them),
        # a moving average over successful requests: what ``expected_ms`` predicts from.
        self._ms_per_token: float | None = None

    def expected_ms(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> float | None:
        if self._ms_per_token is None:
            return None
        return self._ms_per_token * _prompt_tokens(prefix, suffixes)

    def _check_deadline(self) -> None:
        """Called between layers: a late request is abandoned there, so it does not hold the engine
        (and every request queued behind it) for a forward whose answer nobody will read."""
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
            self.last_work = _no_work()
            self.slots.install(adapter)
            start = time.perf_counter()
            try:
                kv = self._extend(None, 0, prefix) if prefix else None  # once per request
                out = np.empty(len(suffixes), dtype=np.float32)
                self._score_group(kv, len(prefix), list(range(len(suffixes))), 0, suffixes, out)
                self._observe((time.perf_counter() - start) * 1000.0 / _prompt_tokens(prefix, suffixes))
                return out
            except DeadlineExceeded:
                # An abandoned forward needed at least the time it ran: a floor for the pace, so
                # requests with deadlines it cannot meet stop starting forwards.
                floor = (time.perf_counter() - start) * 1000.0 / _prompt_tokens(prefix, suffixes)
                self._ms_per_token = max(self._ms_per_token or 0.0, floor)
                raise
            finally:
                self._deadline = None
                self.slots.install(None)

    def _observe(self, ms_per_token: float, weight: float = 0.3) -> None:
        previous = self._ms_per_token
        self._ms_per_token = ms_per_token if previous is None else previous + weight * (ms_per_token - previous)

    def _extend(self, kv: KV | None, p: int, tokens: Sequence[int]) -> KV:
        """Keys/values of the context after appending ``tokens``."""
        self._count(1, len(tokens), p)
        return self.ragged.forward(kv, p, [tokens], extend=True, before_layer=self._check_deadline)[1]

    def _count(self, rows: int, length: int, context: int) -> None:
        self.last_work["tokens"] += rows * length
        self.last_work["attention_pairs"] += rows * length * (context + (length + 1) / 2)

    def _score_group(self, kv, p: int, rows: list[int], offset: int, suffixes: Sequence[Sequence[int]],
                     out: np.ndarray) -> None:
        """Score ``rows`` (whose suffixes agree up to ``offset``) on the context ``kv`` of length p.

        A run the rows share is computed once when that saves at least ``min_saving`` tokens of
        work (a separate forward of a short run costs more than it saves). Either way the rows
        are split where they first differ, and each subgroup that shares enough is handled the
        same way; the rest are scored together on this context.
        """
        shared = _common_prefix(suffixes, rows, offset)
        if len(rows) > 1 and shared and (len(rows) - 1) * shared >= self.min_saving:
            kv = self._extend(kv, p, suffixes[rows[0]][offset : offset + shared])
            p, offset, shared = p + shared, offset + shared, 0
        split = offset + shared  # the first position where the rows differ
        groups: dict[int, list[int]] = {}
        for r in rows:
            groups.setdefault(suffixes[r][split] if len(suffixes[r]) > split + 1 else -1, []).append(r)
        leaves = []
        for key, members in groups.items():
            if key != -1 and 1 < len(members) < len(rows) and \
                    (len(members) - 1) * _common_prefix(suffixes, members, offset) >= self.min_saving:
                self._score_group(kv, p, members, offset, suffixes, out)
            else:
                leaves += members
        # Similar lengths share a chunk, so the padded layout of attention wastes little.
        leaves.sort(key=lambda r: len(suffixes[r]))
        for start in range(0, len(leaves), self.max_batch):
            chunk = leaves[start : start + self.max_batch]
            out[chunk] = self._score_chunk(kv, p, [suffixes[r][offset:] for r in chunk])

    def _score_chunk(self, kv: KV | None, p: int, suffixes: Sequence[Sequence[int]]) -> np.ndarray:
        for s in suffixes:
            self._count(1, len(s), p)
        self.last_work["final_queries"] += len(suffixes)
        self.last_work["final_attention_pairs"] += sum(p + len(s) for s in suffixes)
        hidden, _ = self.ragged.forward(kv, p, suffixes, before_layer=self._check_deadline)
        logits = hidden.float() @ self.label_rows.T
        return torch.sigmoid(logits[:, 0] - logits[:, 1]).cpu().numpy()


def _prompt_tokens(prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> int:
    return len(prefix) + sum(len(s) for s in suffixes)


def _no_work() -> dict[str, int]:
    return {"tokens": 0, "attention_pairs": 0, "final_queries": 0, "final_attention_pairs": 0}


def _common_prefix(suffixes: Sequence[Sequence[int]], rows: list[int], offset: int) -> int:
    """Tokens after ``offset`` that every row shares, leaving each at least one token of its own."""
    first = suffixes[rows[0]]
    limit = min(len(suffixes[r]) for r in rows) - offset - 1
    n = 0
    while n < limit and all(suffixes[r][offset + n] == first[offset + n] for r in rows):
        n += 1
    return max(n, 0)
