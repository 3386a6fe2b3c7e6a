"""A small personalized LoRA (random banks and gates) and bundles of its prototype adapters, for
the suites of the export, the reader and serving by prototype."""

from __future__ import annotations

from pathlib import Path

import torch

from service.bundle.writer import BundleWriter
from service.llm.personalized_lora import AdapterMixer, Gate, PersonalizedLoRAConfig
from training.export.prototypes import PrototypeOptions, add_prototypes

CFG = PersonalizedLoRAConfig(r=2, n_meta=3, user_dim=8, gate_hidden=6, temperature=0.2)
MODULES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (16, 8)}


def lora_state(seed: int = 0, cfg: PersonalizedLoRAConfig = CFG) -> dict[str, torch.Tensor]:
    """Random meta-LoRA banks and gates, as ``lora/weights.safetensors`` stores them."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    state = {}
    for name, (d_in, d_out) in MODULES.items():
        state[f"{name}.lora_A"] = torch.randn(cfg.n_meta, d_in, cfg.r, generator=gen)
        state[f"{name}.lora_B"] = torch.randn(cfg.n_meta, cfg.r, d_out, generator=gen)
        for key, value in Gate(cfg).state_dict().items():
            state[f"{name}.gate.{key}"] = value
    return state


def user_reps(n: int = 60, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, CFG.user_dim, generator=torch.Generator().manual_seed(seed))


def write_bundle(store: Path, version: str, count: int, seed: int = 0, reps: torch.Tensor | None = None) -> Path:
    """A bundle of the LoRA alone (lora/*) and, with ``count``, its prototypes."""
    state = lora_state()
    with BundleWriter(store, version) as writer:
        writer.add_json("lora/config.json", CFG.model_dump())
        writer.add_safetensors("lora/weights.safetensors", state)
        if count:
            add_prototypes(writer, AdapterMixer(CFG, state), user_reps() if reps is None else reps,
                           PrototypeOptions(count, seed), "base")
    return writer.path
