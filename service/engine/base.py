"""The interface every scoring engine (embedded torch, remote vLLM) implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from service.llm.personalized_lora import AdapterMixer


@dataclass(frozen=True)
class UserAdapter:
    """One user's materialized LoRA: per target module (A: d_in x r, B: r x d_out) and its scaling.

    ``key`` names the weights uniquely (user or prototype, bundle version, content hash) so a
    cache or a remote server never confuses two adapters.
    """

    key: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    user_id: str = ""  # whose adapter: remote engines route a user to the replica holding it
    prototype: str | None = None  # the prototype it stands for, shared by its users (None: the user's own)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


@dataclass(frozen=True)
class LoRABanks:
    """A version's meta-LoRA banks, which an engine that mixes in its forward holds once for every
    user: per target module ``A`` (n_meta x d_in x r) and ``B`` (n_meta x r x d_out), in
    ``module_names`` order, and the LoRA scaling. ``key`` names them uniquely (the version)."""

    key: str
    module_names: tuple[str, ...]
    a: tuple[torch.Tensor, ...]
    b: tuple[torch.Tensor, ...]
    scaling: float

    @classmethod
    def of(cls, key: str, mixer: "AdapterMixer") -> "LoRABanks":
        """A trained personalized LoRA's banks (its mixer's, shared, not copied) under ``key``."""
        return cls(key, tuple(mixer.module_names), tuple(mixer.banks_a), tuple(mixer.banks_b), mixer.cfg.scaling)


@dataclass(frozen=True)
class UserMixture:
    """One user's adapter as its gate weights over a version's banks, never materialized: the
    engine computes each row's LoRA term from the banks and its user's ``alphas`` (n_modules x
    n_meta) inside the forward, so rows of different users share one forward. ``key`` names user,
    version and mixture as ``UserAdapter.key`` does."""

    key: str
    banks: LoRABanks
    alphas: torch.Tensor
    user_id: str = ""
    prototype: str | None = None  # the prototype it stands for, shared by its users (None: the user's own)


Adapter = UserAdapter | UserMixture


@dataclass(frozen=True)
class EngineCall:
    """One request's scoring work: its adapter, prompt prefix and candidate suffixes, and the
    ``time.perf_counter()`` instant after which nobody reads the answer (None: no deadline).

    ``embeds`` (rows, hidden), float32: input embeddings the prompt names by id, token id
    ``EMBED_ID_BASE + k`` reading row ``k`` (``service.llm.collab_tokens``: the collaborative
    tokens, the user's row 0 and candidate j's row 1 + j); None where the prompt has none."""

    adapter: Adapter | None
    prefix: Sequence[int]
    suffixes: Sequence[Sequence[int]]
    deadline: float | None = None
    embeds: torch.Tensor | None = None

    @property
    def banks_key(self) -> str | None:
        """The banks a mixture adapter mixes over (None for any other): calls share a forward only
        with calls of the same banks."""
        return self.adapter.banks.key if isinstance(self.adapter, UserMixture) else None


class ForwardInterrupted(Exception):
    """A forward stopped because ``interrupted()`` said more urgent work is waiting."""


class ScoringEngine(Protocol):
    # True where the engine takes ``UserMixture`` adapters and computes every row's mixture in its
    # forward (no per-user adapter is built or cached); else it takes materialized ``UserAdapter``s.
    mixes_in_forward: bool
    # True where the engine takes input embeddings by id (``EngineCall.embeds``: collaborative
    # tokens); an engine without them refuses a version whose prompts carry them.
    takes_embeds: bool

    def score(self, adapter: Adapter | None, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
              deadline: float | None = None, interrupted: Callable[[], bool] | None = None,
              embeds: torch.Tensor | None = None) -> np.ndarray:
        """P(Yes) per suffix, each scored as prefix + suffix with the adapter installed (and the
        ``embeds`` its ids name, as ``EngineCall.embeds``); work past ``deadline`` (a
        time.perf_counter() instant) may be abandoned with a TimeoutError, and work for which
        ``interrupted()`` turns true with ForwardInterrupted (background scoring yields the engine
        to a request that waits; engines that cannot stop early ignore it)."""
        ...

    def expected_ms(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> float | None:
        """How long scoring these prompts is expected to take, from the engine's recent requests;
        None when it cannot say. The caller skips an LLM stage that would overrun its deadline."""
        ...

    def preload(self, adapters: Sequence[UserAdapter]) -> None:
        """Make a version's shared (prototype) adapters ready before it serves: a remote engine
        loads them on every replica, so scoring by prototype loads nothing; the embedded engine
        installs per forward and needs nothing."""
        ...

    def close(self) -> None:
        """Release connections and threads (called once, when the service stops)."""
        ...
