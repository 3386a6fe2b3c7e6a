"""The reader checks a bundle's prototype parts (count, file set, centroid and adapter shapes,
mixtures) against its LoRA and refuses every mismatch with a message naming the file."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from service.bundle import MANIFEST_NAME, BundleError, load_bundle
from service.bundle import prototypes as parts
from tests.prototype_support import CFG, write_bundle

COUNT = 3


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def tampered(root: Path, files: dict[str, bytes | None], config: dict | None = None,
             component: bool = True) -> Path:
    """``root`` with files replaced (bytes) or removed (None) and the manifest listing what is on
    disk, honestly hashed: only the prototype checks can refuse it."""
    for rel, data in files.items():
        if data is None:
            (root / rel).unlink()
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    listed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest["files"] = [{"path": rel, "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest(),
                          "size": (root / rel).stat().st_size} for rel in listed]
    if not component:
        manifest["components"].pop(parts.COMPONENT)
    elif config is not None:
        manifest["components"][parts.COMPONENT]["config"].update(config)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path, "v1", COUNT)


def refused(root: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    return str(info.value)


def adapter_with(root: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    weights = load_file(root / parts.weights_path(0))
    change(weights)
    return save({k: v.contiguous() for k, v in weights.items()})


def test_honest_prototypes_load(bundle: Path) -> None:
    assert parts.prototype_count(load_bundle(bundle).manifest) == COUNT


def test_count_larger_than_the_adapters(bundle: Path) -> None:
    error = refused(tampered(bundle, {}, {"count": COUNT + 1}))
    assert f"the 'prototypes' component of {COUNT + 1} prototypes lacks" in error and error.startswith("bundle v1: ")


def test_count_smaller_than_the_adapters(bundle: Path) -> None:
    error = refused(tampered(bundle, {parts.CENTROIDS: npy(np.load(bundle / parts.CENTROIDS)[:-1])},
                             {"count": COUNT - 1}))
    assert re.search(r"prototypes/p2/.*not one of the 2 prototypes", error), error


def test_missing_adapter(bundle: Path) -> None:
    assert "lacks prototypes/p1/adapter_model.safetensors" in refused(tampered(bundle, {parts.weights_path(1): None}))


@pytest.mark.parametrize("count", [0, -1, "3", None])
def test_count_must_be_a_positive_integer(bundle: Path, count) -> None:
    assert "count must be a positive integer" in refused(tampered(bundle, {}, {"count": count}))


def test_centroids_of_the_wrong_shape(bundle: Path) -> None:
    centroids = np.load(bundle / parts.CENTROIDS)
    error = refused(tampered(bundle, {parts.CENTROIDS: npy(centroids[:, :-1])}))
    assert f"{parts.CENTROIDS}: shape is (3, 5)" in error and "(3, 6) = (count, n_modules * n_meta)" in error


def test_centroids_that_are_no_mixtures(bundle: Path) -> None:
    centroids = np.load(bundle / parts.CENTROIDS)
    assert "must be a mixture" in refused(tampered(bundle, {parts.CENTROIDS: npy(centroids * 2)}))
    nan = centroids.copy()
    nan[0, 0] = np.nan
    assert "non-finite" in refused(tampered(bundle, {parts.CENTROIDS: npy(nan)}))


def test_adapter_of_the_wrong_shape(bundle: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"

    def widen(w):
        w[key] = torch.zeros(w[key].shape[0] + 1, w[key].shape[1])

    error = refused(tampered(bundle, {parts.weights_path(0): adapter_with(bundle, widen)}))
    assert f"{parts.weights_path(0)}: {key} has shape (9, {CFG.r}), the LoRA's banks need (8, {CFG.r})" in error


def test_adapter_missing_a_module(bundle: Path) -> None:
    def drop(w):
        for k in [k for k in w if "q_proj" in k]:
            del w[k]

    error = refused(tampered(bundle, {parts.weights_path(0): adapter_with(bundle, drop)}))
    assert "tensors do not match the LoRA's modules" in error


def test_adapter_config_of_another_rank(bundle: Path) -> None:
    config = json.loads((bundle / parts.config_path(2)).read_text())
    error = refused(tampered(bundle, {parts.config_path(2): json.dumps({**config, "r": 8}).encode()}))
    assert f"{parts.config_path(2)}: must be a PEFT LoRA config of rank {CFG.r}" in error


def test_prototype_files_without_a_component(bundle: Path) -> None:
    assert "prototype files without a 'prototypes' component" in refused(tampered(bundle, {}, component=False))


def test_prototypes_without_a_lora(tmp_path: Path, bundle: Path) -> None:
    error = refused(tampered(bundle, {"lora/weights.safetensors": None}))
    assert "needs the LoRA it mixes" in error
