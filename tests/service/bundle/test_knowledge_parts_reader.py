"""The reader checks a bundle's knowledge parts against the CRM that reads them and refuses
every mismatch with a message naming the file and what was expected."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from service.bundle import MANIFEST_NAME, BundleError, load_bundle

N_ITEMS, DIM = 4, 6


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def parts(knowledge_dim: int = DIM, **replace: bytes | None) -> dict[str, bytes]:
    """A CRM config reading ``knowledge_dim``-d knowledge and the knowledge files; ``replace``
    swaps (bytes) or drops (None) files by name: crm, items, default, config."""
    files = {
        "crm/config.json": json.dumps({"n_items": N_ITEMS, "knowledge_dim": knowledge_dim}).encode(),
        "knowledge/item_vectors.npy": npy(np.ones((N_ITEMS + 1, DIM), np.float32)),
        "knowledge/user_default.npy": npy(np.zeros(DIM, np.float32)),
        "knowledge/config.json": json.dumps({"encoder": "all-MiniLM-L6-v2", "dim": DIM, "prompts": {}}).encode(),
    }
    names = {"crm": "crm/config.json", "items": "knowledge/item_vectors.npy", "default": "knowledge/user_default.npy",
             "config": "knowledge/config.json"}
    for name, data in replace.items():
        if data is None:
            files.pop(names[name])
        else:
            files[names[name]] = data
    return files


def make_bundle(root: Path, files: dict[str, bytes], component: bool = True) -> Path:
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    components = {"crm": {"kind": "sim-din"}}
    if component:
        components["knowledge"] = {"kind": "kar-hybrid-expert", "config": {"dim": DIM}}
    (root / MANIFEST_NAME).write_text(json.dumps({
        "schema_version": 1, "version": root.name, "created_at": "2025-01-01T00:00:00+00:00",
        "components": components,
        "files": [{"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                  for rel, data in files.items()],
    }))
    return root


def refused(root: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    return str(info.value)


def test_matching_parts_load(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "v1", parts()))
    assert bundle.manifest.components["knowledge"].kind == "kar-hybrid-expert"
    # a plain CRM without knowledge parts, and a bundle without a CRM, are not affected
    load_bundle(make_bundle(tmp_path / "v2", parts(knowledge_dim=0, items=None, default=None, config=None),
                            component=False))
    load_bundle(make_bundle(tmp_path / "v3", {"crm/config.json": b'{"dim": 8}'}, component=False))


@pytest.mark.parametrize(("files", "component", "message"), [
    (dict(items=npy(np.ones((N_ITEMS, DIM), np.float32))), True,
     r"knowledge/item_vectors.npy: shape is \(4, 6\), the CRM needs \(5, 6\) = \(n_items \+ 1, knowledge_dim\)"),
    (dict(items=npy(np.ones((N_ITEMS + 1, DIM + 1), np.float32))), True,
     r"knowledge/item_vectors.npy: shape is \(5, 7\), the CRM needs \(5, 6\)"),
    (dict(default=npy(np.zeros((1, DIM), np.float32))), True,
     r"knowledge/user_default.npy: shape is \(1, 6\), the CRM needs \(6,\) = \(knowledge_dim,\)"),
    (dict(items=npy(np.full((N_ITEMS + 1, DIM), np.nan, np.float32))), True,
     "knowledge/item_vectors.npy: has non-finite values"),
    (dict(default=npy(np.full(DIM, np.inf, np.float32))), True, "knowledge/user_default.npy: has non-finite values"),
    (dict(items=npy(np.ones((N_ITEMS + 1, DIM), np.int64))), True, "knowledge/item_vectors.npy: must hold floats"),
    (dict(config=json.dumps({"encoder": "all-MiniLM-L6-v2", "dim": 384}).encode()), True,
     "knowledge/config.json: dim is 384, the CRM reads 6-d knowledge"),
    (dict(config=json.dumps({"dim": DIM}).encode()), True, "knowledge/config.json: names no encoder"),
    (dict(default=None), True, "the 'knowledge' component lacks knowledge/user_default.npy"),
    (dict(), False, "knowledge files without a 'knowledge' component"),
    (dict(items=None, default=None, config=None), False,
     "crm/config.json reads 6-d knowledge .* but the bundle has no 'knowledge' component"),
    (dict(crm=json.dumps({"n_items": N_ITEMS, "knowledge_dim": 0}).encode()), True,
     "the 'knowledge' component needs a CRM that reads knowledge, but crm/config.json has knowledge_dim 0"),
    (dict(crm=json.dumps({"n_items": N_ITEMS, "knowledge_dim": "6"}).encode()), True,
     "knowledge_dim must be a non-negative integer"),
])
def test_parts_that_do_not_fit_are_refused(tmp_path: Path, files: dict, component: bool, message: str) -> None:
    error = refused(make_bundle(tmp_path / "v1", parts(**files), component))
    assert re.search(message, error), error
    assert error.startswith("bundle v1: ")
