import pytest
import torch
from torch import nn

from service.engine.base import UserAdapter
from service.engine.lora_slot import LoRASlots


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(16, 12), nn.Linear(12, 16, bias=False)

    def forward(self, x):
        return self.o_proj(self.q_proj(x))


def test_installed_adapter_equals_base_plus_low_rank_update() -> None:
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(5, 16)
    base_q = model.q_proj
    a, b = torch.randn(16, 3), torch.randn(3, 12)
    slots = LoRASlots(model, ["q_proj"])
    slots.install(UserAdapter("u1", {"q_proj": (a, b)}, 0.5))
    with torch.no_grad():
        expected = model.o_proj(base_q(x) + 0.5 * (x @ a) @ b)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        slots.install(None)
        torch.testing.assert_close(model(x), model.o_proj(base_q(x)))
    assert base_q.weight.grad is None and slots.slots["q_proj"].base is base_q  # base untouched


def test_bfloat16_applies_the_factors_beside_the_base() -> None:
    """A merge into bfloat16 weights would round most of a small update away."""
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    slots = LoRASlots(model, ["q_proj"])
    a, b = torch.randn(16, 3) * 0.01, torch.randn(3, 12) * 0.01
    slots.install(UserAdapter("u1", {"q_proj": (a, b)}, 1.0))
    slot = slots.slots["q_proj"]
    assert slot.weight is None and slot.factors[0].dtype == torch.bfloat16
    with torch.no_grad():
        delta = slot(x).float() - slot.base(x).float()
    torch.testing.assert_close(delta, (x.float() @ a) @ b, atol=2e-3, rtol=0.1)


def test_merged_weights_are_kept_for_the_last_adapter_only() -> None:
    model = Block()
    slots = LoRASlots(model, ["q_proj"])
    adapter = UserAdapter("u1", {"q_proj": (torch.randn(16, 2), torch.randn(2, 12))}, 1.0)
    slots.install(adapter)
    first = slots.slots["q_proj"].weight
    slots.install(None)
    slots.install(adapter)
    assert slots.slots["q_proj"].weight is first  # same adapter: no rebuild
    slots.install(UserAdapter("u2", {"q_proj": (torch.randn(16, 2), torch.randn(2, 12))}, 1.0))
    assert slots.slots["q_proj"].weight is not first


def test_an_adapter_missing_a_module_is_refused() -> None:
    slots = LoRASlots(Block(), ["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="lacks modules"):
        slots.install(UserAdapter("u", {"q_proj": (torch.randn(16, 2), torch.randn(2, 12))}, 1.0))
