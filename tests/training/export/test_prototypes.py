"""Prototype adapters at export: seeded k-means over the training users' gate outputs, each
prototype the LoRA mixed at its centroid, written as standard PEFT adapters; the same seed
gives the same bundle parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.bundle import BundleError, file_sha256, load_bundle
from service.bundle import prototypes as parts
from service.llm.personalized_lora import AdapterMixer, PersonalizedLoRAConfig, from_peft_weights
from service.llm.prototypes import PrototypeSet
from tests.prototype_support import CFG, lora_state, user_reps, write_bundle
from training.export.prototypes import PrototypeOptions, fit_prototypes, gate_features, latest_per_user


def test_gate_features_are_every_modules_mixture_concatenated() -> None:
    mixer = AdapterMixer(CFG, lora_state())
    reps = user_reps(5)
    features = gate_features(mixer, reps)
    assert features.shape == (5, 2 * CFG.n_meta)
    for i in range(5):
        np.testing.assert_allclose(features[i], mixer.mixtures(reps[i]).reshape(-1).numpy(), atol=1e-6)


def test_same_seed_same_prototypes() -> None:
    features = gate_features(AdapterMixer(CFG, lora_state()), user_reps(80))
    first = fit_prototypes(features, PrototypeOptions(6, seed=3))
    again = fit_prototypes(features, PrototypeOptions(6, seed=3))
    np.testing.assert_array_equal(first.centroids, again.centroids)
    assert first.sizes.sum() == 80 and (first.sizes > 0).all()
    # every centroid is a mixture per module, like the gate outputs it averages
    np.testing.assert_allclose(first.centroids.reshape(6, 2, CFG.n_meta).sum(-1), 1.0, atol=1e-5)


def test_more_prototypes_than_distinct_users_is_refused() -> None:
    features = gate_features(AdapterMixer(CFG, lora_state()), user_reps(3))
    with pytest.raises(BundleError, match="only 3 distinct"):
        fit_prototypes(features, PrototypeOptions(4))
    with pytest.raises(ValueError):
        PrototypeOptions(-1)


def test_bundle_parts_are_peft_adapters_mixed_at_the_centroids(tmp_path) -> None:
    bundle = load_bundle(write_bundle(tmp_path, "p1", count=4, seed=1))
    component = bundle.manifest.components[parts.COMPONENT]
    assert component.config["count"] == 4 and sum(component.config["sizes"]) == 60
    centroids = bundle.load_npy(parts.CENTROIDS)
    assert centroids.shape == (4, 2 * CFG.n_meta)
    mixer = AdapterMixer(CFG, lora_state())
    for i in range(4):
        config = json.loads(bundle.path(parts.config_path(i)).read_text())
        assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", CFG.r, CFG.lora_alpha)
        assert config["target_modules"] == ["q_proj", "v_proj"]
        stored = from_peft_weights(load_file(bundle.path(parts.weights_path(i))))
        exact = mixer.adapter(torch.from_numpy(centroids[i]).reshape(2, CFG.n_meta))
        for name, (a, b) in exact.items():
            torch.testing.assert_close(stored[name][0], a)
            torch.testing.assert_close(stored[name][1], b)
    loaded = PrototypeSet.from_bundle(bundle)
    assert len(loaded) == 4
    # the users' assignment is the nearest centroid of their gate outputs
    reps = user_reps()
    for rep in reps[:10]:
        alphas = mixer.mixtures(rep)
        distances = ((torch.from_numpy(centroids) - alphas.reshape(1, -1)) ** 2).sum(1)
        assert loaded.nearest(alphas) == int(distances.argmin())


def test_export_is_deterministic_for_a_seed(tmp_path) -> None:
    one, two = write_bundle(tmp_path, "a", 5, seed=7), write_bundle(tmp_path, "b", 5, seed=7)
    for rel in [parts.CENTROIDS] + [parts.weights_path(i) for i in range(5)]:
        assert file_sha256(one / rel) == file_sha256(two / rel), rel


def test_no_prototypes_by_default(tmp_path) -> None:
    bundle = load_bundle(write_bundle(tmp_path, "exact", 0))
    assert parts.COMPONENT not in bundle.manifest.components
    assert PrototypeSet.from_bundle(bundle) is None


def test_a_shared_lora_has_no_prototypes(tmp_path) -> None:
    from service.bundle.writer import BundleWriter
    from training.export.prototypes import add_prototypes

    shared = PersonalizedLoRAConfig(r=2, n_meta=1, gated=False, user_dim=8)
    state = {k: v[:1] for k, v in lora_state().items() if ".gate." not in k}
    with pytest.raises(BundleError, match="gated"):
        with BundleWriter(tmp_path, "s") as writer:
            add_prototypes(writer, AdapterMixer(shared, state), user_reps(), PrototypeOptions(2))


def test_latest_sample_per_user() -> None:
    import pandas as pd

    samples = pd.DataFrame({"user_idx": [2, 1, 2, 1], "hist_end": [3, 5, 9, 2], "order": [0, 1, 2, 3],
                            "item_idx": [10, 11, 12, 13]})
    latest = latest_per_user(samples)
    assert latest["user_idx"].tolist() == [1, 2] and latest["item_idx"].tolist() == [11, 12]


def test_export_of_a_trained_lora_with_prototypes(world, tmp_path) -> None:
    """The world's LoRA exported with prototypes: one per cluster of the training users' latest
    gate outputs, loaded by the runtime, each the LoRA's mixture at its centroid."""
    from service.model import load_model
    from service.registry.validation import check_prototypes
    from training.export.crm_bundle import export_crm_bundle
    from training.llm.fusion_fit import FusionOptions

    path = export_crm_bundle(world.data_dir, world.crm_dir, tmp_path, "proto", llm_dir=world.root / "lora",
                             base_model=world.base_dir, llm_report=world.root / "report",
                             fusion=FusionOptions(samples=50, serve="fused"), prototypes=PrototypeOptions(4, seed=2))
    model = load_model(path)
    assert len(model.prototypes) == 4
    config = model.bundle.manifest.components[parts.COMPONENT].config
    assert config["users"] == world.data.split("train")["user_idx"].nunique() == sum(config["sizes"])
    assert "rank" not in check_prototypes(model)[0] and "4 adapters" in check_prototypes(model)[0]
    assert load_model(path, prototypes=False).prototypes is None
