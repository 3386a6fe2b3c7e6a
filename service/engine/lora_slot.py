"""One swappable LoRA slot per target module of a loaded base model.

In float32, installing a user's adapter swaps in merged weights, ``W + scaling * (A B)^T``, built
once per adapter (and kept for the adapter installed last): a forward then costs exactly the base
model's matmuls, instead of two thin extra matmuls, a scale and an add per target module and
token. In bfloat16 a merge would lose most of the update (a LoRA delta is far below the 8-bit
mantissa step of the weight it is added to), so there the factors are applied beside the base.
The base weights are never modified or reloaded; the engine serializes forwards.

A forward of several users' rows installs their mixtures instead (``install_mixtures``): each
slot holds its module's meta-LoRA banks flattened, ``A_cat`` (d_in x n_meta*r) and ``B_cat``
(n_meta*r x d_out, scaled), and every token's gate weights ``a``; the LoRA term of token ``x`` is
``h = sum_k a_k (x A_k)``, then ``(a outer h) B_cat = sum_k a_k h B_k``, which is exactly
``x A_u B_u`` for the user's mixed ``A_u = sum_k a_k A_k``, ``B_u = sum_k a_k B_k``, with no
per-user adapter built. The weighting runs in float32; the two matmuls in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.base import LoRABanks, UserAdapter


class TokenMixtures:
    """Every packed token's gate weights, (tokens, n_modules, n_meta) in float32, and the subset a
    forward's last layer computes queries and the MLP for (the answer positions)."""

    def __init__(self, per_token: torch.Tensor, answers: torch.Tensor) -> None:
        self.per_token = per_token
        self.at_answers = per_token[answers]

    def of(self, module: int, tokens: int) -> torch.Tensor:
        """(tokens, n_meta) of one module for an input of ``tokens`` rows: all packed tokens, or the
        answer positions (when every token is an answer the two are the same tokens in order)."""
        table = self.per_token if tokens == len(self.per_token) else self.at_answers
        if len(table) != tokens:
            raise ValueError(f"{tokens} input tokens match neither the forward's {len(self.per_token)} tokens "
                             f"nor its {len(self.at_answers)} answers")
        return table[:, module]


class LoRASlotLinear(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.weight: torch.Tensor | None = None  # the installed adapter's merged weight (float32)
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None  # or its A and scaling * B
        # or the banks' A_cat, B_cat (scaled), this module's index and every token's gate weights
        self.banks: tuple[torch.Tensor, torch.Tensor, int, TokenMixtures] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.base.bias)
        out = self.base(x)
        if self.banks is not None:
            return self._mixed(x, out, *self.banks)
        if self.factors is None:
            return out
        a, b = self.factors
        # one fused multiply-add into the base output, with the scaling folded into B
        out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ a, b)
        return out

    @staticmethod
    def _mixed(x: torch.Tensor, out: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, module: int,
               mixtures: TokenMixtures) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        alpha = mixtures.of(module, len(flat))  # (tokens, n_meta) float32
        h = (flat @ a_cat).float().view(len(flat), alpha.shape[1], -1)  # (tokens, n_meta, r): x A_k
        h = torch.einsum("tk,tkr->tr", alpha, h)  # x A_u
        z = (alpha[:, :, None] * h[:, None, :]).reshape(len(flat), -1).to(b_cat.dtype)  # (tokens, n_meta*r)
        out.view(-1, out.shape[-1]).addmm_(z, b_cat)
        return out

    def merged(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """``W + scaling * (A B)^T`` in float32, rounded once to the base dtype."""
        w = self.base.weight
        return torch.addmm(w.float(), b.float().T, a.float().T, alpha=scaling).to(w.dtype)


class LoRASlots:
    """Replaces every target Linear of ``model`` with a slot; ``install`` swaps adapters in."""

    def __init__(self, model: nn.Module, target_modules: list[str]) -> None:
        self.slots: dict[str, LoRASlotLinear] = {}
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in target_modules and isinstance(module, nn.Linear):
                parent_name, _, leaf = name.rpartition(".")
                slot = LoRASlotLinear(module)
                setattr(model.get_submodule(parent_name) if parent_name else model, leaf, slot)
                self.slots[name] = slot
        if not self.slots:
            raise ValueError(f"no nn.Linear named {target_modules} in the model")
        self.merge = next(model.parameters()).dtype == torch.float32
        self._installed: tuple[str, dict] | None = None  # the last adapter's key and prepared weights
        self._banks: tuple[str, dict] | None = None  # the last banks' key and their flattened factors

    @torch.no_grad()
    def install_mixtures(self, banks: LoRABanks, mixtures: TokenMixtures) -> None:
        """Every token through its own user's mixture of ``banks`` (see the module docstring)."""
        self._check_modules(banks.key, banks.module_names)
        index = {name: m for m, name in enumerate(banks.module_names)}
        if self._banks is None or self._banks[0] != banks.key:
            self._banks = None
            self._banks = (banks.key, {name: self._flatten(slot, banks, index[name])
                                       for name, slot in self.slots.items()})
        for name, slot in self.slots.items():
            slot.weight = slot.factors = None
            slot.banks = (*self._banks[1][name], index[name], mixtures)

    @staticmethod
    def _flatten(slot: LoRASlotLinear, banks: LoRABanks, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A_cat (d_in, n_meta*r) and scaling * B_cat (n_meta*r, d_out) in the base's dtype."""
        a, b = banks.a[m].float(), banks.b[m].float()  # (n_meta, d_in, r), (n_meta, r, d_out)
        dtype = slot.base.weight.dtype
        return (a.permute(1, 0, 2).reshape(a.shape[1], -1).to(dtype).contiguous(),
                (b.reshape(-1, b.shape[2]) * banks.scaling).to(dtype).contiguous())

    @torch.no_grad()
    def install_mixture(self, key: str, banks: LoRABanks, alphas: torch.Tensor) -> None:
        """One user's mixture for a whole forward: ``A_u = sum_k a_k A_k``, ``B_u = sum_k a_k B_k``
        built from the banks per module (a few thousand multiply-adds each) and installed as an
        adapter, which costs a forward less than the per-token path (no n_meta-wide matmuls)."""
        self._check_modules(key, banks.module_names)

        def mixed() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            a = alphas.float()
            return {name: (torch.einsum("k,kir->ir", a[m], banks.a[m].float()),
                           torch.einsum("k,kro->ro", a[m], banks.b[m].float()))
                    for m, name in enumerate(banks.module_names) if name in self.slots}

        self._use(key, mixed, banks.scaling)

    @torch.no_grad()
    def install(self, adapter: UserAdapter | None) -> None:
        if adapter is None:
            for slot in self.slots.values():
                slot.weight = slot.factors = slot.banks = None
            return
        self._check_modules(adapter.key, adapter.weights)
        self._use(adapter.key, lambda: adapter.weights, adapter.scaling)

    def _check_modules(self, key: str, modules) -> None:
        missing = set(self.slots) - set(modules)
        if missing:
            raise ValueError(f"adapter {key} lacks modules {sorted(missing)[:3]}")

    def _use(self, key: str, weights, scaling: float) -> None:
        """Install the adapter named ``key``, preparing its ``weights()`` unless it was the last one."""
        if self._installed is None or self._installed[0] != key:
            self._installed = None  # free the previous adapter's weights before building these
            built = weights()
            self._installed = (key, {name: self._prepare(slot, *built[name], scaling)
                                     for name, slot in self.slots.items()})
        for name, slot in self.slots.items():
            prepared = self._installed[1][name]
            slot.banks = None
            slot.weight, slot.factors = (prepared, None) if self.merge else (None, prepared)

    def _prepare(self, slot: LoRASlotLinear, a: torch.Tensor, b: torch.Tensor, scaling: float):
        if self.merge:
            return slot.merged(a, b, scaling)
        dtype = slot.base.weight.dtype
        return a.to(dtype), (b.float() * scaling).to(dtype)
