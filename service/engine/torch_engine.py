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
from typing import Any

import numpy as np
import torch

from service.config import TorchSettings
from service.engine.base import Adapter, EngineCall, ForwardInterrupted, LoRABanks, UserMixture
from service.engine import native
from service.engine.lora_slot import LoRASlots, TokenMixtures
from service.engine.ragged import KV, RaggedDecoder, Row
from service.llm.collab_tokens import EMBED_ID_BASE


PACE_STALE_S = 10.0  # a pace older than this predicts nothing (see ``TorchEngine.expected_ms``)


class DeadlineExceeded(TimeoutError):
    """The engine stopped a forward because the request's deadline passed."""


class TorchEngine:
    mixes_in_forward = True  # takes UserMixture adapters; rows of several users share a forward
    takes_embeds = True  # ids at or above EMBED_ID_BASE read the call's embeds (collaborative tokens)

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
        # The forward running now: its calls, those still wanted, those that ended early, whether
        # to stop for other work, and the mixtures its tokens take (banks, alphas per call).
        self._calls: Sequence[EngineCall] = ()
        self._alive: set[int] = set()
        self._failed: dict[int, BaseException] = {}
        self._interrupted: Callable[[], bool] | None = None
        self._mixtures: tuple[LoRABanks, torch.Tensor] | None = None
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

    def preload(self, adapters: Sequence[UserAdapter]) -> None:
        """Nothing to do: each forward installs its adapter into the slots."""

    def close(self) -> None:
        """Nothing to release: the model lives as long as the process."""

    @contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """The base LLM with no adapter installed, for other work on it (knowledge generation):
        no forward runs meanwhile."""
        with self._lock:
            self.slots.install(None)
            yield self.model

    @torch.inference_mode()
    def score(self, adapter: Adapter | None, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
              deadline: float | None = None, interrupted: Callable[[], bool] | None = None,
              embeds: torch.Tensor | None = None) -> np.ndarray:
        """P(Yes) per suffix; ``deadline`` is a ``time.perf_counter()`` instant after which the
        forward stops with DeadlineExceeded; ``interrupted()`` true between layers stops it with
        ForwardInterrupted; ``embeds`` as ``EngineCall.embeds``."""
        result = self.score_many([EngineCall(adapter, prefix, suffixes, deadline, embeds)], interrupted)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    @torch.inference_mode()
    def score_many(self, calls: Sequence[EngineCall], interrupted: Callable[[], bool] | None = None
                   ) -> list[np.ndarray | BaseException]:
        """Several requests' candidates in shared packed forwards: P(Yes) per suffix for each call,
        or the exception that ended it. Calls of several users carry ``UserMixture`` adapters of one
        version's banks (each row's LoRA term is its user's mixture, computed in the forward). A call
        whose deadline passes between layers is dropped (DeadlineExceeded) and the others go on; the
        forward stops once none is left. ``interrupted()`` true stops every call (ForwardInterrupted)."""
        results: list[np.ndarray | BaseException | None] = [None] * len(calls)
        for i, call in enumerate(calls):
            if not call.suffixes:
                results[i] = np.zeros(0, dtype=np.float32)
            elif any(len(s) == 0 for s in call.suffixes):
                results[i] = ValueError("every candidate suffix needs at least one token")
        if len(calls) > 1:
            _check_packable(calls)
        with self._lock:
            now = time.perf_counter()
            for i, call in enumerate(calls):
                if results[i] is None and call.deadline is not None and now > call.deadline:
                    results[i] = DeadlineExceeded("the request deadline passed while waiting for the engine")
            self._alive = {i for i, r in enumerate(results) if r is None}
            if not self._alive:
                return results  # type: ignore[return-value]
            self._calls, self._failed, self._interrupted = calls, {}, interrupted
            self.last_extensions = []
            self._install(calls)
            tokens = sum(_prompt_tokens(calls[i].prefix, calls[i].suffixes) for i in self._alive)
            start = time.perf_counter()

            def pace() -> float:  # milliseconds per prompt token so far
                return (time.perf_counter() - start) * 1000.0 / tokens

            outs = {i: np.empty(len(calls[i].suffixes), dtype=np.float32) for i in self._alive}
            try:
                self._score_tree(calls, outs)
                self._observe(pace())
            except DeadlineExceeded:
                # An abandoned forward needed at least the time it ran: a floor for the pace, so
                # requests with deadlines it cannot meet stop starting forwards.
                self._ms_per_token = max(self._ms_per_token or 0.0, pace())
            except Exception as exc:
                self._failed.update({i: exc for i in self._alive})
                self._alive = set()
            finally:
                self._interrupted = None
                self._last_forward = time.monotonic()
                self.slots.install(None)
                self._mixtures = None
            for i, out in outs.items():
                results[i] = self._failed.get(i, out)
            self._calls, self._failed = (), {}
            return results  # type: ignore[return-value]

    def _install(self, calls: Sequence[EngineCall]) -> None:
        """One user's adapter (materialized, or mixed from the banks once for the whole request)
        stays installed for every forward; several users' mixtures are installed per forward, for
        the tokens of its rows. The two round differently below float32, so in bfloat16 a user's
        scores in a packed forward differ from its lone forward's by rounding (float32: within 1e-5)."""
        first = calls[0].adapter
        self._mixtures = None
        if not isinstance(first, UserMixture):
            self.slots.install(first)
        elif len({call.adapter.key for call in calls}) == 1:
            self.slots.install_mixture(first.key, first.banks, first.alphas)
        else:
            self._mixtures = (first.banks, torch.stack([call.adapter.alphas.float() for call in calls]))
            self.slots.install(None)

    def _check_deadline(self) -> None:
        """Called between layers: a late request is abandoned there, so it does not hold the engine
        (and every request queued behind it) for a forward whose answer nobody will read; and
        background work yields there to a request that waits."""
        now = time.perf_counter()
        for i in sorted(self._alive):
            deadline = self._calls[i].deadline
            if deadline is not None and now > deadline:
                self._alive.discard(i)
                self._failed[i] = DeadlineExceeded("the request deadline passed during the LLM forward")
        if not self._alive:
            raise DeadlineExceeded("the request deadline passed during the LLM forward")
        if self._interrupted is not None and self._interrupted():
            raise ForwardInterrupted("a request is waiting for the engine")

    def _observe(self, ms_per_token: float, weight: float = 0.3) -> None:
        previous = self._ms_per_token
        self._ms_per_token = ms_per_token if previous is None else previous + weight * (ms_per_token - previous)

    def _score_tree(self, calls: Sequence[EngineCall], outs: dict[int, np.ndarray]) -> None:
        """Score every call's suffixes on its prefix's cache, radix-tree style, one tree level (of
        every call at once) per forward.

        A run of tokens that several suffixes share is computed once, as a row that extends its
        parent's cache, where that saves at least ``torch_min_shared_tokens`` tokens of work (a shared run
        costs a row of its own and a cache copy). The rows on the next level sit on that cache.
        Each level's rows, whatever their contexts and users, run packed in one forward, so a request
        takes as many forwards as its tree is deep (typically three) rather than one per shared run.
        """
        # The prefix, with the start every suffix shares (each keeps a token of its own), once per
        # request: a run all suffixes share costs no forward of its own (the prompt forms end their
        # prefix just before a candidate's text, so its first words are often everyone's).
        starts = {i: _common_prefix(calls[i].suffixes, list(range(len(calls[i].suffixes))), 0) for i in self._alive}
        prefixes = [(i, Row(list(calls[i].prefix) + list(calls[i].suffixes[0][: starts[i]]), None, True))
                    for i in sorted(self._alive) if calls[i].prefix or starts[i]]
        contexts: dict[int, KV] = {}
        if prefixes:
            self.last_extensions += [len(row.tokens) for _, row in prefixes]
            caches = self._run([row for _, row in prefixes], [i for i, _ in prefixes])[1]
            contexts = dict(zip((i for i, _ in prefixes), caches))
        level = [(i, _Node(contexts.get(i), list(range(len(calls[i].suffixes))), starts[i]))
                 for i in sorted(self._alive)]
        max_batch = self.settings.torch_max_batch
        while level:
            # per row: the row, its call, and a run's (members, offset) or a leaf's suffix
            items: list[tuple[Row, int, str, Any]] = []
            for owner, node in level:
                if owner not in self._alive:
                    continue
                runs: list[tuple[Row, list[int], int]] = []
                leaves: list[tuple[Row, int]] = []
                self._plan(node, calls[owner].suffixes, runs, leaves)
                items += [(row, owner, "run", (members, offset)) for row, members, offset in runs]
                items += [(row, owner, "leaf", r) for row, r in leaves]
            items.sort(key=lambda item: len(item[0].tokens))  # similar lengths share a chunk: little padding
            level = []
            for start in range(0, len(items), max_batch):
                chunk = [item for item in items[start : start + max_batch] if item[1] in self._alive]
                if not chunk:
                    continue
                hidden, caches = self._run([row for row, *_ in chunk], [owner for _, owner, *_ in chunk])
                scored = [(owner, what) for _, owner, kind, what in chunk if kind == "leaf"]
                if scored:
                    logits = hidden @ self.label_rows.T  # float32 hidden states
                    probs = torch.sigmoid(logits[:, 0] - logits[:, 1]).cpu().numpy()
                    for (owner, r), p in zip(scored, probs):
                        outs[owner][r] = p
                grown = [(owner, what) for _, owner, kind, what in chunk if kind == "run"]
                level += [(owner, _Node(cache, members, offset))
                          for cache, (owner, (members, offset)) in zip(caches, grown)]

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

    def _run(self, rows: list[Row], owners: list[int]) -> tuple[torch.Tensor | None, list[KV]]:
        """One packed forward of ``rows``; ``owners`` names each row's call (whose mixture its
        tokens take)."""
        if self.observe_rows is not None:
            self.observe_rows(rows)
        if self._mixtures is not None:
            banks, alphas = self._mixtures
            lengths = torch.tensor([len(r.tokens) for r in rows])
            per_token = alphas[torch.repeat_interleave(torch.tensor(owners), lengths)]  # (tokens, modules, n_meta)
            last = lengths.cumsum(0) - 1
            scoring = [j for j, r in enumerate(rows) if not r.extend]
            self.slots.install_mixtures(banks, TokenMixtures(per_token, last[scoring]))
        return self.ragged.run(rows, before_layer=self._check_deadline, embeds=self._embeds_of(rows, owners))

    def _embeds_of(self, rows: list[Row], owners: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed positions, float32 vectors) of the rows' tokens that name their call's
        ``embeds`` (ids from ``EMBED_ID_BASE``); None where no call of the forward has any. Two
        calls' equal ids name each call's own rows, and a suffix's id is its own, so a shared run
        of the radix tree never reaches past a collaborative token."""
        if all(self._calls[i].embeds is None for i in set(owners)):
            return None
        positions, vectors, at = [], [], 0
        for row, owner in zip(rows, owners):
            for offset, token in enumerate(row.tokens):
                if token >= EMBED_ID_BASE:
                    table = self._calls[owner].embeds
                    if table is None or token - EMBED_ID_BASE >= len(table):
                        raise ValueError(f"token {token} names an input embedding the call does not carry")
                    positions.append(at + offset)
                    vectors.append(table[token - EMBED_ID_BASE])
            at += len(row.tokens)
        if not positions:
            return None
        return torch.tensor(positions, dtype=torch.long), torch.stack(vectors).float()


@dataclass
class _Node:
    """Suffixes ``rows`` that agree up to ``offset``, on the cache ``context`` of what precedes."""

    context: KV | None
    rows: list[int]
    offset: int


def _check_packable(calls: Sequence[EngineCall]) -> None:
    """Calls share a forward only as mixtures of one version's banks."""
    banks = {call.banks_key for call in calls}
    if None in banks or len(banks) != 1:
        raise ValueError("only calls with user mixtures of the same version's banks share a forward")


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
