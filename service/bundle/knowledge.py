"""The knowledge parts of a bundle, checked against the CRM that reads them.

A CRM with ``knowledge_dim > 0`` in ``crm/config.json`` reads LLM knowledge vectors; its bundle
carries ``knowledge/item_vectors.npy`` (n_items + 1, knowledge_dim), ``knowledge/user_default.npy``
(knowledge_dim,) and ``knowledge/config.json`` (encoder, dim, prompts, ...) under a ``knowledge``
component. A bundle has all of these or none, and a CRM without knowledge has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.bundle.manifest import BundleManifest

COMPONENT = "knowledge"
ITEM_VECTORS = "knowledge/item_vectors.npy"
USER_DEFAULT = "knowledge/user_default.npy"
CONFIG = "knowledge/config.json"
CRM_CONFIG = "crm/config.json"


def knowledge_problem(root: Path, manifest: BundleManifest) -> str | None:
    """Why the knowledge parts do not fit the CRM, or None when they do (or neither has any).

    Runs after the files passed the reader's checks (listed, hashed, valid JSON and NPY headers).
    """
    files = {e.path for e in manifest.files}
    crm = json.loads((root / CRM_CONFIG).read_text()) if CRM_CONFIG in files else {}
    dim = crm.get("knowledge_dim", 0) if isinstance(crm, dict) else 0
    if type(dim) is not int or dim < 0:
        return f"{CRM_CONFIG}: knowledge_dim must be a non-negative integer, got {dim!r}"
    has_component = COMPONENT in manifest.components
    parts = sorted(p for p in files if p.startswith("knowledge/"))
    if not has_component and not parts:
        if dim:
            return (f"{CRM_CONFIG} reads {dim}-d knowledge (knowledge_dim), but the bundle has no "
                    f"{COMPONENT!r} component with {ITEM_VECTORS}, {USER_DEFAULT} and {CONFIG}")
        return None
    if not has_component:
        return f"{', '.join(parts)}: knowledge files without a {COMPONENT!r} component in the manifest"
    if not dim:
        return (f"the {COMPONENT!r} component needs a CRM that reads knowledge, but {CRM_CONFIG} "
                "has knowledge_dim 0 (or no CRM)")
    missing = [p for p in (ITEM_VECTORS, USER_DEFAULT, CONFIG) if p not in files]
    if missing:
        return f"the {COMPONENT!r} component lacks {', '.join(missing)}"
    n_items = crm.get("n_items")
    if type(n_items) is not int or n_items < 1:
        return f"{CRM_CONFIG}: n_items must be a positive integer, got {n_items!r}"
    problem = (_array_problem(root, ITEM_VECTORS, (n_items + 1, dim), "(n_items + 1, knowledge_dim)")
               or _array_problem(root, USER_DEFAULT, (dim,), "(knowledge_dim,)"))
    if problem:
        return problem
    config = json.loads((root / CONFIG).read_text())
    if not isinstance(config, dict):
        return f"{CONFIG}: must be a JSON object"
    encoder = config.get("encoder")
    if not isinstance(encoder, str) or not encoder:
        return f"{CONFIG}: names no encoder (a non-empty string)"
    if config.get("dim") != dim:
        return f"{CONFIG}: dim is {config.get('dim')!r}, the CRM reads {dim}-d knowledge (knowledge_dim)"
    return None


def _array_problem(root: Path, rel: str, shape: tuple[int, ...], meaning: str) -> str | None:
    array = np.load(root / rel, allow_pickle=False)
    if array.shape != shape:
        return f"{rel}: shape is {array.shape}, the CRM needs {shape} = {meaning}"
    if not np.issubdtype(array.dtype, np.floating):
        return f"{rel}: must hold floats, got {array.dtype}"
    if not np.isfinite(array).all():
        return f"{rel}: has non-finite values (NaN or infinity)"
    return None
