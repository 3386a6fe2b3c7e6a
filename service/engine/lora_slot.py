"""One swappable LoRA slot per target module of a loaded base model.

Installing a user's adapter swaps in merged weights, ``W + scaling * (A B)^T``, built once per
adapter (and kept for the adapter installed last): a forward then costs exactly the base model's
matmuls, instead of two thin extra matmuls, a scale and an add per target module and token. The
base weights are never modified or reloaded; the engine serializes forwards, so a forward always
sees exactly one user's adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.base import UserAdapter


class LoRASlotLinear(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.weight: torch.Tensor | None = None  # the installed adapter's merged weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.base(x)
        return F.linear(x, self.weight, self.base.bias)

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
        self._merged: tuple[str, dict[str, torch.Tensor]] | None = None

    @torch.no_grad()
    def install(self, adapter: UserAdapter | None) -> None:
        if adapter is None:
            for slot in self.slots.values():
                slot.weight = None
            return
        missing = set(self.slots) - set(adapter.weights)
        if missing:
            raise ValueError(f"adapter {adapter.key} lacks modules {sorted(missing)[:3]}")
        if self._merged is None or self._merged[0] != adapter.key:
            self._merged = None  # free the previous adapter's weights before building these
            self._merged = (adapter.key, {name: slot.merged(*adapter.weights[name], adapter.scaling)
                                          for name, slot in self.slots.items()})
        for name, slot in self.slots.items():
            slot.weight = self._merged[1][name]
