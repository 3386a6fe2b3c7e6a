"""One swappable LoRA slot per target module of a loaded base model.

In float32, installing a user's adapter swaps in merged weights, ``W + scaling * (A B)^T``, built
once per adapter (and kept for the adapter installed last): a forward then costs exactly the base
model's matmuls, instead of two thin extra matmuls, a scale and an add per target module and
token. In bfloat16 a merge would lose most of the update (a LoRA delta is far below the 8-bit
mantissa step of the weight it is added to), so there the factors are applied beside the base.
The base weights are never modified or reloaded; the engine serializes forwards, so a forward
always sees exactly one user's adapter.
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
        self.weight: torch.Tensor | None = None  # the installed adapter's merged weight (float32)
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None  # or its A and scaling * B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.base.bias)
        out = self.base(x)
        if self.factors is None:
            return out
        a, b = self.factors
        # one fused multiply-add into the base output, with the scaling folded into B
        out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ a, b)
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

    @torch.no_grad()
    def install(self, adapter: UserAdapter | None) -> None:
        if adapter is None:
            for slot in self.slots.values():
                slot.weight = slot.factors = None
            return
        missing = set(self.slots) - set(adapter.weights)
        if missing:
            raise ValueError(f"adapter {adapter.key} lacks modules {sorted(missing)[:3]}")
        if self._installed is None or self._installed[0] != adapter.key:
            self._installed = None  # free the previous adapter's weights before building these
            self._installed = (adapter.key, {name: self._prepare(slot, *adapter.weights[name], adapter.scaling)
                                             for name, slot in self.slots.items()})
        for name, slot in self.slots.items():
            prepared = self._installed[1][name]
            slot.weight, slot.factors = (prepared, None) if self.merge else (None, prepared)

    def _prepare(self, slot: LoRASlotLinear, a: torch.Tensor, b: torch.Tensor, scaling: float):
        if self.merge:
            return slot.merged(a, b, scaling)
        dtype = slot.base.weight.dtype
        return a.to(dtype), (b.float() * scaling).to(dtype)
