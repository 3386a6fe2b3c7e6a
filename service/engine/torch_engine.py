"""The embedded scoring engine: one prefix forward, then all candidate suffixes on its KV cache.

A request's candidates share the prompt prefix (chat header, profile, instructions), so the prefix
is computed once and its keys/values are broadcast to every suffix row instead of recomputed.
Suffixes often share more: candidates whose retrieved histories begin with the same behaviours
have identical leading tokens. Those shared runs are computed once too, radix-tree style, and the
rows after them sit on the extended cache; each level of the tree is one packed forward
(``RaggedDecoder.run``) whatever the rows' contexts, so sharing costs no extra forwards. Only the
answer position of each row is projected, onto the two label rows of the output embedding, in
float32 (bfloat16 logits would quantize the probabilities).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from service.config import TorchSettings
from service.engine.base import ForwardInterrupted, UserAdapter
from service.engine import native
from service.engine.lora_slot import LoRASlots
from service.engine.ragged import KV, RaggedDecoder, Row


PACE_STALE_S = 10.0  # a pace older than this predicts nothing (see ``TorchEngine.expected_ms``)


class DeadlineExceeded(TimeoutError):
    """The engine stopped a forward because the request's deadline passed."""


class TorchEngine:
    def __init__(self, model, settings: TorchSettings | None = None, *, yes_id: int, no_id: int,
                 target_modules: list[str], pace_max_age_s: float | None = PACE_STALE_S) -> None:
        """``settings``: the packed batch size, when a shared run is computed once, native kernels."""
        self.model = model.eval()
        self.settings = settings or TorchSettings()
        self.pace_max_age_s = pace_max_age_s
        on_cpu = model.get_output_embeddings().weight.device.type == "cpu"
        self.ragged = RaggedDecoder(model, native.load() if self.settings.torch_native_kernels and on_cpu else None)
        self.label_rows = model.get_output_embeddings().weight[[yes_id, no_id]].detach().float()
        self.slots = LoRASlots(model, target_modules)
        self._lock = threading.Lock()  # one forward at a time: the installed adapter is per forward
        self._deadline: float | None = None
        self._interrupted: Callable[[], bool] | None = None
        # Called with every packed forward's rows before it runs (benchmarks count FLOPs from them).
        self.observe_rows: Callable[[list[Row]], None] | None = None
        self.last_extensions: list[int] = []  # lengths of the runs the last request cached (prefix first)
        # Recent milliseconds per prompt token (prefix + suffixes, as a caller counts them),
        # a moving average over successful requests: what ``expected_ms`` predicts from.
        self._ms_per_token: float | None = None
        self._last_forward = float("-inf")  # time.monotonic() when the last forward ended

    def expected_ms(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> float | None:
        """None (no prediction: the caller tries) before the first forward, and when no forward ran
        for ``pace_max_age_s``: a pace measured in a slow moment would otherwise keep requests
        whose deadlines it rules out from ever running the forward that would correct it. Such a
        probe either finishes and updates the pace, or is abandoned and confirms it. Where
        background forwards run (the LLM score cache scores what requests skipped), they keep the
        pace measured, so it never ages out (``pace_max_age_s=None``) and no request is spent on a
        probe."""
        if self._ms_per_token is None:
            return None
        if self.pace_max_age_s is not None and time.monotonic() - self._last_forward > self.pace_max_age_s:
            return None
        return self._ms_per_token * _prompt_tokens(prefix, suffixes)

    def close(self) -> None:
        """Nothing to release: the model lives as long as the process."""

    @contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """The base LLM with no adapter installed, for other work on it (knowledge generation):
        no forward runs meanwhile."""
        with self._lock:
            self.slots.install(None)
            yield self.model

    def _check_deadline(self) -> None:
        """Called between layers: a late request is abandoned there, so it does not hold the engine
        (and every request queued behind it) for a forward whose answer nobody will read; and
        background work yields there to a request that waits."""
        if self._deadline is not None and time.perf_counter() > self._deadline:
            raise DeadlineExceeded("the request deadline passed during the LLM forward")
        if self._interrupted is not None and self._interrupted():
            raise ForwardInterrupted("a request is waiting for the engine")

    @torch.inference_mode()
    def score(self, adapter: UserAdapter | None, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
              deadline: float | None = None, interrupted: Callable[[], bool] | None = None) -> np.ndarray:
        """P(Yes) per suffix; ``deadline`` is a ``time.perf_counter()`` instant after which the
        forward stops with DeadlineExceeded; ``interrupted()`` true between layers stops it with
        ForwardInterrupted."""
        if not suffixes:
            return np.zeros(0, dtype=np.float32)
        if any(len(s) == 0 for s in suffixes):
            raise ValueError("every candidate suffix needs at least one token")
        with self._lock:
            if deadline is not None and time.perf_counter() > deadline:
                raise DeadlineExceeded("the request deadline passed while waiting for the engine")
            self._deadline, self._interrupted = deadline, interrupted
            self.last_extensions = [len(prefix)] if prefix else []
            self.slots.install(adapter)
            start = time.perf_counter()

            def pace() -> float:  # milliseconds per prompt token so far
                return (time.perf_counter() - start) * 1000.0 / _prompt_tokens(prefix, suffixes)

            try:
                out = np.empty(len(suffixes), dtype=np.float32)
                self._score_tree(prefix, suffixes, out)
                self._observe(pace())
                return out
            except DeadlineExceeded:
                # An abandoned forward needed at least the time it ran: a floor for the pace, so
                # requests with deadlines it cannot meet stop starting forwards.
                self._ms_per_token = max(self._ms_per_token or 0.0, pace())
                raise
            finally:
                self._deadline = self._interrupted = None
                self._last_forward = time.monotonic()
                self.slots.install(None)

    def _observe(self, ms_per_token: float, weight: float = 0.3) -> None:
        previous = self._ms_per_token
        self._ms_per_token = ms_per_token if previous is None else previous + weight * (ms_per_token - previous)

    def _score_tree(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], out: np.ndarray) -> None:
        """Score every suffix on the prefix's cache, radix-tree style, one tree level per forward.

        A run of tokens that several suffixes share is computed once, as a row that extends its
        parent's cache, where that saves at least ``torch_min_shared_tokens`` tokens of work (a shared run
        costs a row of its own and a cache copy). The rows on the next level sit on that cache.
        Each level's rows, whatever their contexts, run packed in one forward, so a request takes
        as many forwards as its tree is deep (typically three) rather than one per shared run.
        """
        context = None
        if prefix:  # once per request
            context = self._run([Row(prefix, None, True)])[1][0]
        level = [_Node(context, list(range(len(suffixes))), 0)]
        while level:
            runs: list[tuple[Row, list[int], int]] = []  # extending rows, with the suffixes and offset that continue on each
            leaves: list[tuple[Row, int]] = []  # scoring rows and the suffix each scores
            for node in level:
                self._plan(node, suffixes, runs, leaves)
            rows = [(row, ("run", (members, offset))) for row, members, offset in runs]
            rows += [(row, ("leaf", r)) for row, r in leaves]
            rows.sort(key=lambda item: len(item[0].tokens))  # similar lengths share a chunk: little padding
            level = []
            max_batch = self.settings.torch_max_batch
            for start in range(0, len(rows), max_batch):
                chunk = rows[start : start + max_batch]
                hidden, caches = self._run([row for row, _ in chunk])
                scored = [what for _, (kind, what) in chunk if kind == "leaf"]
                if scored:
                    logits = hidden @ self.label_rows.T  # float32 hidden states
                    out[scored] = torch.sigmoid(logits[:, 0] - logits[:, 1]).cpu().numpy()
                grown = [what for _, (kind, what) in chunk if kind == "run"]
                level += [_Node(cache, members, offset) for cache, (members, offset) in zip(caches, grown)]

    def _plan(self, node: "_Node", suffixes: Sequence[Sequence[int]], runs: list, leaves: list) -> None:
        """Place ``node``'s rows (suffixes agreeing up to ``node.offset``) on this level: its shared
        run as one extending row when that saves enough (the node then continues on the next
        level), else each subgroup that shares enough is planned the same way and the other rows
        are scored here."""
        rows, offset = node.rows, node.offset
        min_saving = self.settings.torch_min_shared_tokens
        shared = _common_prefix(suffixes, rows, offset)
        if len(rows) > 1 and shared and (len(rows) - 1) * shared >= min_saving:
            run = suffixes[rows[0]][offset : offset + shared]
            runs.append((Row(run, node.context, True), rows, offset + shared))
            self.last_extensions.append(len(run))
            return
        groups: dict[int, list[int]] = {}
        for r in rows:  # split where the rows first differ
            groups.setdefault(suffixes[r][offset + shared] if len(suffixes[r]) > offset + shared + 1 else -1, []).append(r)
        for key, members in groups.items():
            if key != -1 and 1 < len(members) < len(rows) and \
                    (len(members) - 1) * _common_prefix(suffixes, members, offset) >= min_saving:
                self._plan(_Node(node.context, members, offset), suffixes, runs, leaves)
            else:
                leaves += [(Row(suffixes[r][offset:], node.context), r) for r in members]

    def _run(self, rows: list[Row]) -> tuple[torch.Tensor | None, list[KV]]:
        if self.observe_rows is not None:
            self.observe_rows(rows)
        return self.ragged.run(rows, before_layer=self._check_deadline)


@dataclass
class _Node:
    """Suffixes ``rows`` that agree up to ``offset``, on the cache ``context`` of what precedes."""

    context: KV | None
    rows: list[int]
    offset: int


def _prompt_tokens(prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> int:
    return len(prefix) + sum(len(s) for s in suffixes)


def _common_prefix(suffixes: Sequence[Sequence[int]], rows: list[int], offset: int) -> int:
    """Tokens after ``offset`` that every row shares, leaving each at least one token of its own."""
    first = suffixes[rows[0]]
    limit = min(len(suffixes[r]) for r in rows) - offset - 1
    n = 0
    while n < limit and all(suffixes[r][offset + n] == first[offset + n] for r in rows):
        n += 1
    return max(n, 0)
