"""Adapter checks against the base model: module set, shapes, finiteness, the rank limit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from service.llm.personalized_lora import AdapterMixer, Gate, PersonalizedLoRAConfig
from service.registry.errors import ValidationFailed
from tests.tiny_llama import build_tiny_llama
from service.registry.validation import BaseModelSpec, check_lora

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (16, 8),
           "model.layers.0.mlp.up_proj": (16, 32)}


def model_with(cfg: PersonalizedLoRAConfig, shapes: dict[str, tuple[int, int]], fill: float = 0.01):
    state = {}
    for name, (d_in, d_out) in shapes.items():
        state[f"{name}.lora_A"] = torch.full((cfg.n_meta, d_in, cfg.r), fill)
        state[f"{name}.lora_B"] = torch.full((cfg.n_meta, cfg.r, d_out), fill)
        for key, value in _gate_state(cfg).items():
            state[f"{name}.gate.{key}"] = value
    return SimpleNamespace(mixer=AdapterMixer(cfg, state), lora_config=cfg)


def _gate_state(cfg):
    return Gate(cfg).state_dict()


CFG = PersonalizedLoRAConfig(r=4, n_meta=2, user_dim=8, gate_hidden=6)
SPEC = BaseModelSpec(MODULES)
TARGETS = {k: v for k, v in MODULES.items() if "mlp" not in k}


def test_a_fitting_lora_passes():
    assert "rank 4" in check_lora(model_with(CFG, TARGETS), SPEC, max_rank=8)[0]


def test_rank_over_the_serving_limit():
    with pytest.raises(ValidationFailed, match="exceeds the serving limit") as info:
        check_lora(model_with(CFG, TARGETS), SPEC, max_rank=2)
    assert info.value.reason == "rank_limit"


def test_shape_not_matching_the_base_model():
    wrong = dict(TARGETS) | {"model.layers.0.self_attn.v_proj": (16, 9)}
    with pytest.raises(ValidationFailed, match="the base model needs") as info:
        check_lora(model_with(CFG, wrong), SPEC, max_rank=8)
    assert info.value.reason == "incompatible"


def test_missing_or_foreign_modules():
    with pytest.raises(ValidationFailed, match="missing"):
        check_lora(model_with(CFG, {"model.layers.0.self_attn.q_proj": (16, 16)}), SPEC, max_rank=8)
    with pytest.raises(ValidationFailed, match="not in the base model"):
        check_lora(model_with(CFG, TARGETS | {"model.layers.9.self_attn.q_proj": (16, 16)}), SPEC, max_rank=8)


def test_non_finite_weights():
    with pytest.raises(ValidationFailed, match="NaN"):
        check_lora(model_with(CFG, TARGETS, fill=float("nan")), SPEC, max_rank=8)


def test_spec_read_from_a_model_directory_without_weights(tmp_path):
    spec = BaseModelSpec.from_pretrained_config(build_tiny_llama(tmp_path / "tiny"))
    q = [n for n in spec.linear_shapes if n.endswith("q_proj")]
    assert q and all(len(spec.linear_shapes[n]) == 2 for n in q)


def test_prototypes_must_be_the_mixtures_at_their_centroids(tmp_path):
    from service.bundle import load_bundle
    from service.llm.prototypes import PrototypeSet
    from service.registry.validation import check_prototypes
    from tests.prototype_support import CFG as PCFG, lora_state, write_bundle

    prototypes = PrototypeSet.from_bundle(load_bundle(write_bundle(tmp_path, "v1", 3)))
    model = SimpleNamespace(mixer=AdapterMixer(PCFG, lora_state()), prototypes=prototypes)
    assert check_prototypes(model) == ["prototypes: 3 adapters, each the mixture at its centroid"]
    assert check_prototypes(SimpleNamespace(mixer=model.mixer, prototypes=None)) == []
    with pytest.raises(ValidationFailed, match="3 prototype adapters exceed the serving limit of 2") as info:
        check_prototypes(model, max_prototypes=2)
    assert info.value.reason == "prototype_limit"
    other = SimpleNamespace(mixer=AdapterMixer(PCFG, lora_state(seed=1)), prototypes=prototypes)  # another LoRA
    with pytest.raises(ValidationFailed, match="prototype p0: .* is not the LoRA's mixture at its centroid"):
        check_prototypes(other)
