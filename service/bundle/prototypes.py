"""The prototype parts of a bundle, checked against the LoRA whose mixtures they are.

A bundle exported with ``--prototypes P`` carries, under a ``prototypes`` component whose config
records ``count`` = P, the centroids of the training users' gate outputs
(``prototypes/centroids.npy``, (P, n_modules * n_meta): per module, the n_meta mixture weights)
and one standard PEFT adapter per prototype (``prototypes/p<i>/adapter_model.safetensors`` and
``adapter_config.json``): the meta-LoRAs mixed by that centroid. A bundle has all of these or
none; the checks read array and tensor headers, so a wrong count or shape is refused before
anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.bundle.manifest import BundleManifest

COMPONENT = "prototypes"
CENTROIDS = "prototypes/centroids.npy"
LORA_WEIGHTS = "lora/weights.safetensors"
PEFT_PREFIX, PEFT_A, PEFT_B = "base_model.model.", ".lora_A.weight", ".lora_B.weight"
SUM_TOL = 1e-3  # each module's centroid weights are a mean of softmax outputs: they sum to 1


def prototype_name(index: int) -> str:
    """The name a prototype is served and reported by: ``p<index>``."""
    return f"p{index}"


def weights_path(index: int) -> str:
    return f"prototypes/{prototype_name(index)}/adapter_model.safetensors"


def config_path(index: int) -> str:
    return f"prototypes/{prototype_name(index)}/adapter_config.json"


def prototype_count(manifest: BundleManifest) -> int:
    """P as the manifest records it (0 without prototypes: exact per-user adapters)."""
    component = manifest.components.get(COMPONENT)
    return int(component.config.get("count", 0)) if component is not None else 0


def prototypes_problem(root: Path, manifest: BundleManifest) -> str | None:
    """Why the prototype parts do not fit, or None when they do (or the bundle has none).

    Runs after the files passed the reader's checks (listed, hashed, valid JSON, NPY and
    safetensors headers)."""
    files = {e.path for e in manifest.files}
    parts = sorted(p for p in files if p.startswith("prototypes/"))
    component = manifest.components.get(COMPONENT)
    if component is None:
        return f"{', '.join(parts[:3])}: prototype files without a {COMPONENT!r} component" if parts else None
    count = component.config.get("count")
    if type(count) is not int or count < 1:
        return f"the {COMPONENT!r} component's count must be a positive integer, got {count!r}"
    if LORA_WEIGHTS not in files:
        return f"the {COMPONENT!r} component needs the LoRA it mixes ({LORA_WEIGHTS})"
    expected = {CENTROIDS} | {weights_path(i) for i in range(count)} | {config_path(i) for i in range(count)}
    missing, extra = sorted(expected - set(parts)), sorted(set(parts) - expected)
    if missing:
        return f"the {COMPONENT!r} component of {count} prototypes lacks {', '.join(missing[:3])}"
    if extra:
        return f"{', '.join(extra[:3])}: not one of the {count} prototypes the manifest records"
    banks = _bank_shapes(root / LORA_WEIGHTS)
    if not banks:
        return f"{LORA_WEIGHTS}: no meta-LoRA banks for the prototypes to mix"
    n_meta = next(iter(banks.values()))[0][0]
    problem = _centroids_problem(root, count, len(banks), n_meta)
    if problem:
        return problem
    for i in range(count):
        problem = _adapter_problem(root, i, banks)
        if problem:
            return problem
    return None


def _bank_shapes(path: Path) -> dict[str, tuple[list[int], list[int]]]:
    """Module -> (lora_A shape (n_meta, d_in, r), lora_B shape (n_meta, r, d_out)), from the header."""
    shapes = _tensor_shapes(path)
    return {key[:-len(".lora_A")]: (shape, shapes.get(key[:-len(".lora_A")] + ".lora_B", []))
            for key, shape in sorted(shapes.items()) if key.endswith(".lora_A")}


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}


def _centroids_problem(root: Path, count: int, n_modules: int, n_meta: int) -> str | None:
    centroids = np.load(root / CENTROIDS, allow_pickle=False)
    shape = (count, n_modules * n_meta)
    if centroids.shape != shape:
        return (f"{CENTROIDS}: shape is {centroids.shape}, the {count} prototypes of {n_modules} modules' "
                f"{n_meta}-way gates need {shape} = (count, n_modules * n_meta)")
    if not np.issubdtype(centroids.dtype, np.floating):
        return f"{CENTROIDS}: must hold floats, got {centroids.dtype}"
    if not np.isfinite(centroids).all():
        return f"{CENTROIDS}: has non-finite values (NaN or infinity)"
    sums = centroids.reshape(count, n_modules, n_meta).sum(-1)
    if (centroids < 0).any() or np.abs(sums - 1.0).max() > SUM_TOL:
        return f"{CENTROIDS}: a prototype's weights per module must be a mixture (non-negative, summing to 1)"
    return None


def _adapter_problem(root: Path, index: int, banks: dict[str, tuple[list[int], list[int]]]) -> str | None:
    rel = weights_path(index)
    shapes = _tensor_shapes(root / rel)
    want = {}
    for module, (a, b) in banks.items():
        if len(a) != 3 or len(b) != 3:
            return f"{LORA_WEIGHTS}: {module}: meta-LoRA banks of shapes {a} / {b}"
        want[f"{PEFT_PREFIX}{module}{PEFT_A}"] = [a[2], a[1]]  # (r, d_in)
        want[f"{PEFT_PREFIX}{module}{PEFT_B}"] = [b[2], b[1]]  # (d_out, r)
    if set(shapes) != set(want):
        missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
        return f"{rel}: tensors do not match the LoRA's modules: missing {missing[:2]}, unexpected {extra[:2]}"
    for name, shape in sorted(want.items()):
        if shapes[name] != shape:
            return f"{rel}: {name} has shape {tuple(shapes[name])}, the LoRA's banks need {tuple(shape)}"
    config = json.loads((root / config_path(index)).read_text())
    rank = next(iter(banks.values()))[0][2]
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or config.get("r") != rank:
        return f"{config_path(index)}: must be a PEFT LoRA config of rank {rank}"
    return None
