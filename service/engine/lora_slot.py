"""One swappable LoRA slot per target module of a loaded base model.

Installing a user's adapter only rebinds tensor references (no copy, no reload of the base);
the engine serializes forwards, so a forward always sees exactly one user's adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from service.engine.base import UserAdapter


class LoRASlotLinear(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.scaling = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.a is None:
            return out
        return out + (x @ self.a) @ self.b * self.scaling


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
        self.dtype = next(model.parameters()).dtype
        self._converted: tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None

    def install(self, adapter: UserAdapter | None) -> None:
        if adapter is None:
            for slot in self.slots.values():
                slot.a = slot.b = None
            return
        missing = set(self.slots) - set(adapter.weights)
        if missing:
            raise ValueError(f"adapter {adapter.key} lacks modules {sorted(missing)[:3]}")
        if self._converted is None or self._converted[0] != adapter.key:
            self._converted = (adapter.key, {n: (a.to(self.dtype), b.to(self.dtype)) for n, (a, b) in adapter.weights.items()})
        for name, slot in self.slots.items():
            slot.a, slot.b = self._converted[1][name]
            slot.scaling = adapter.scaling
