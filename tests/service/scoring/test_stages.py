"""The adapter step: a user's own mixture in exact mode, the nearest prototype's adapter where the
version serves prototypes (shared, named by the prototype, never built per user)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from service.bundle import load_bundle
from service.llm.personalized_lora import AdapterMixer
from service.llm.prototypes import PrototypeSet
from service.personalization.adapter_cache import AdapterCache
from service.scoring.stages import prototype_adapters, user_adapter
from tests.prototype_support import CFG, lora_state, user_reps, write_bundle


def model(tmp_path, prototypes: bool):
    mixer = AdapterMixer(CFG, lora_state())
    served = PrototypeSet.from_bundle(load_bundle(write_bundle(tmp_path, "v1", 4))) if prototypes else None
    return SimpleNamespace(version="v1", mixer=mixer, lora_config=CFG, prototypes=served)


def test_prototype_mode_serves_the_nearest_prototype(tmp_path) -> None:
    m = model(tmp_path, prototypes=True)
    cache = AdapterCache()
    seen = set()
    for i, rep in enumerate(user_reps(20, seed=5)):
        adapter = user_adapter(m, f"u{i}", rep, cache)
        index = m.prototypes.nearest(m.mixer.mixtures(rep))
        assert adapter.prototype == f"p{index}" and adapter.key.startswith(f"p{index}@v1#")
        assert adapter.weights is m.prototypes.weights[index]  # the loaded weights, shared, not rebuilt
        assert adapter.user_id == ""  # no user in its name: every user of the prototype shares it
        seen.add(adapter.prototype)
    assert len(cache) == 0 and len(seen) > 1
    assert [a.prototype for a in prototype_adapters(m)] == ["p0", "p1", "p2", "p3"]


def test_exact_mode_mixes_the_users_own(tmp_path) -> None:
    m = model(tmp_path, prototypes=False)
    rep = user_reps(1)[0]
    adapter = user_adapter(m, "u1", rep, None)
    assert adapter.prototype is None and adapter.key.startswith("u1@v1#")
    for name, (a, b) in m.mixer.adapter(m.mixer.mixtures(rep)).items():
        torch.testing.assert_close(adapter.weights[name][0], a)
    assert prototype_adapters(m) == []
