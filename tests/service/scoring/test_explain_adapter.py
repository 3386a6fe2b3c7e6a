"""What an explanation says of the user's adapter: the gates' mixture over the meta-LoRAs, one
shared LoRA, or the prototype the version serves the user and its centroid's mixture."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.prototype_support import CFG, lora_state

from service.llm.personalized_lora import AdapterMixer, PersonalizedLoRAConfig
from service.llm.prototypes import PrototypeSet
from service.scoring.explain import explain_adapter
from service.scoring.stages import CRMResult


def crm_of(seed: int) -> CRMResult:
    return CRMResult(np.zeros(1), torch.randn(CFG.user_dim, generator=torch.Generator().manual_seed(seed)))


def test_meta_loras_report_the_users_own_gate_mixture():
    mixer = AdapterMixer(CFG, lora_state())
    crm = crm_of(1)
    explained = explain_adapter(SimpleNamespace(mixer=mixer, prototypes=None), crm, top_k=2)
    alphas = mixer.mixtures(crm.user_rep).numpy()
    assert explained.kind == "meta_loras" and explained.prototype is None and explained.temperature == CFG.temperature
    mixture = explained.mixture
    assert mixture.n_meta == CFG.n_meta and [g.group for g in mixture.layers] == ["layers.0"]
    top = mixture.averaged.top
    assert len(top) == 2 and top[0].meta_lora == int(alphas.mean(0).argmax())
    assert top[0].weight == pytest.approx(float(alphas.mean(0).max()))


def test_a_version_serving_prototypes_names_the_users_prototype():
    mixer = AdapterMixer(CFG, lora_state())
    crm = crm_of(2)
    own = mixer.mixtures(crm.user_rep).reshape(-1)
    far = torch.tensor([1.0, 0.0, 0.0]).repeat(len(own) // CFG.n_meta)  # every gate on meta-LoRA 0
    centroids = torch.stack([far, own + 0.01])  # the user's own mixture lies nearest to p1
    prototypes = PrototypeSet(centroids, ({}, {}), ("d0", "d1"))
    explained = explain_adapter(SimpleNamespace(mixer=mixer, prototypes=prototypes), crm, top_k=3)
    assert explained.prototype == prototypes.name(1)
    expected = centroids[1].reshape(len(mixer.module_names), -1).numpy().mean(0)
    assert [w.meta_lora for w in explained.prototype_mixture.averaged.top] == list(np.argsort(-expected))
    assert explained.mixture.averaged.top[0].weight == pytest.approx(float(own.reshape(2, -1).mean(0).max()))


def test_a_single_shared_lora_says_so():
    cfg = PersonalizedLoRAConfig(r=2, n_meta=1, user_dim=8, gated=False)
    state = {k: v[:1] for k, v in lora_state(cfg=CFG).items() if ".gate." not in k}
    explained = explain_adapter(SimpleNamespace(mixer=AdapterMixer(cfg, state), prototypes=None), crm_of(3), 3)
    assert explained.kind == "single_lora" and explained.mixture is None and explained.prototype is None
