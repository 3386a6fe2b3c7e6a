"""The adapter step: a user's own mixture in exact mode, the nearest prototype's adapter where the
version serves prototypes (shared, named by the prototype, never built per user)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

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


def bundle_with(bundle: Path, out: Path, files: dict[str, bytes]) -> Path:
    """A copy of ``bundle`` with ``files`` replaced, its manifest's sizes and hashes made to match."""
    import hashlib
    import json
    import shutil

    from service.bundle import MANIFEST_NAME

    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for path, content in files.items():
        (out / path).write_bytes(content)
        entry = next(f for f in manifest["files"] if f["path"] == path)
        entry["sha256"], entry["size"] = hashlib.sha256(content).hexdigest(), len(content)
    manifest["version"] = out.name
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


SUPPORT_FUSION = {"w_llm": 0.1, "w_crm": 1.2, "bias": 0.3, "serve": "fused",
                  "item_support": {"edges": [1, 10, 50], "w_llm": [2.0, 1.0, 0.5, 0.1],
                                   "w_crm": [0.1, 0.5, 1.0, 1.2], "bias": [0.0, 0.1, 0.2, 0.3]}}


def test_a_fusion_by_item_support_reads_each_candidates_support_from_the_catalog(world, tmp_path) -> None:
    import io
    import json

    import numpy as np

    from service.model import Fusion, load_model
    from service.model.catalog import SUPPORT_COLUMN
    from service.scoring.stages import fuse

    bundle = bundle_with(world.bundle_dir, tmp_path / "v", {"fusion.json": json.dumps(SUPPORT_FUSION).encode()})
    model = load_model(bundle)
    items = model.catalog.items["item_idx"].to_numpy()[:12]
    support = model.catalog.items[SUPPORT_COLUMN].to_numpy()[:12]
    crm, llm = np.linspace(0.2, 0.7, 12), np.linspace(0.9, 0.3, 12)
    llm[3] = np.nan  # no LLM score: the CRM's is served
    final = fuse(model, crm, llm, items)
    fusion = Fusion.from_json(SUPPORT_FUSION)
    has = ~np.isnan(llm)
    np.testing.assert_allclose(final[has], fusion(llm[has], crm[has], support[has]), rtol=1e-12)
    assert final[3] == crm[3]

    # The same fusion beside a catalog that does not record support is refused at load.
    buffer = io.BytesIO()
    model.catalog.items.drop(columns=[SUPPORT_COLUMN]).to_parquet(buffer)
    bare = bundle_with(bundle, tmp_path / "bare", {"items/catalog.parquet": buffer.getvalue()})
    with pytest.raises(ValueError, match=SUPPORT_COLUMN):
        load_model(bare)
