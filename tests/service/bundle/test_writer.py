"""The writer publishes only complete, valid bundles, atomically, and never clobbers a version."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from service.bundle import MANIFEST_NAME, BundleError, file_sha256, load_bundle
from service.bundle.writer import BundleWriter


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name.startswith("."))


def write_simple(store: Path, version: str = "v1", **kwargs: object) -> Path:
    with BundleWriter(store, version, **kwargs) as w:
        w.add_json("metrics.json", {"auc": 0.5, "version": version})
    return w.path


def test_round_trip_all_kinds(tmp_path: Path) -> None:
    store = tmp_path / "model_store"
    weights = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"w_t": weights.T, "row": weights[1], "emb": torch.randn(5, 3, dtype=torch.bfloat16)}
    embeddings = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    catalog = pd.DataFrame({"item_idx": [1, 2], "title": ["Heat", "Up"], "genres": ["Action", ""]})
    users = pa.table({"user_id": ["u1", "u2"], "user_idx": [1, 2]})
    source = tmp_path / "prebuilt.parquet"
    pa.parquet.write_table(pa.table({"k": [3, 4]}), source)

    with BundleWriter(store, "2025-01-01_a", description="nightly") as w:
        assert w.staging.is_dir() and w.staging.parent == store
        w.add_json("crm/config.json", {"dim": 8, "layers": [64, 32]})
        w.add_safetensors("crm/weights.safetensors", state, metadata={"arch": "sim-din"})
        w.add_npy("items/embeddings.npy", embeddings)
        w.add_parquet("items/catalog.parquet", catalog)
        w.add_parquet("maps/users.parquet", users)
        w.add_file("maps/extra.parquet", source)
        w.set_component("crm", kind="sim-din", config={"dim": 8})
        w.set_component("items", kind="catalog")
        w.set_metrics({"auc": 0.71, "ndcg@10": 0.3})
        w.set_parents(["2024-12-31_a"])
        w.set_extra({"git": "abc123"})
        assert not w.target.exists()  # nothing is published before a clean exit

    assert w.path == store / "2025-01-01_a"
    assert leftovers(store) == []

    bundle = load_bundle(w.path)
    m = bundle.manifest
    assert (m.version, m.description, m.parents, m.extra) == ("2025-01-01_a", "nightly", ["2024-12-31_a"], {"git": "abc123"})
    assert m.metrics == {"auc": 0.71, "ndcg@10": 0.3}
    assert m.components["crm"].kind == "sim-din" and m.components["crm"].config == {"dim": 8}
    assert m.components["items"].config == {}
    assert m.created_at.tzinfo is not None
    assert [e.path for e in m.files] == sorted(e.path for e in m.files)

    loaded = bundle.load_safetensors("crm/weights.safetensors")
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    np.testing.assert_array_equal(bundle.load_npy("items/embeddings.npy"), embeddings)
    pd.testing.assert_frame_equal(bundle.load_parquet_pandas("items/catalog.parquet"), catalog)
    assert bundle.load_parquet("maps/users.parquet").equals(users)
    assert bundle.load_parquet("maps/extra.parquet").column("k").to_pylist() == [3, 4]
    assert bundle.load_json("crm/config.json") == {"dim": 8, "layers": [64, 32]}

    on_disk = {p.relative_to(w.path).as_posix() for p in w.path.rglob("*") if p.is_file()}
    assert on_disk == {e.path for e in m.files} | {MANIFEST_NAME}
    for entry in m.files:
        assert entry.sha256 == file_sha256(w.path / entry.path)
        assert entry.size == (w.path / entry.path).stat().st_size
    assert file_sha256(w.path / "maps/extra.parquet") == file_sha256(source)


def test_refuses_existing_version(tmp_path: Path) -> None:
    first = write_simple(tmp_path)
    before = (first / "metrics.json").read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        with BundleWriter(tmp_path, "v1") as w:
            w.add_json("metrics.json", {"auc": 0.9})
    assert (first / "metrics.json").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_existing_version_refused_before_any_work(tmp_path: Path) -> None:
    write_simple(tmp_path)
    ran = False
    with pytest.raises(BundleError, match="already exists"):
        with BundleWriter(tmp_path, "v1"):
            ran = True
    assert not ran
    assert leftovers(tmp_path) == []


def test_refuses_version_published_while_writing(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="already exists"):
        with BundleWriter(tmp_path, "v1") as w:
            w.add_json("metrics.json", {"auc": 0.9})
            write_simple(tmp_path, "v1")
    assert load_bundle(tmp_path / "v1").load_json("metrics.json")["auc"] == 0.5
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_whole_bundle(tmp_path: Path) -> None:
    with BundleWriter(tmp_path, "v1") as w:
        w.add_json("old.json", {"a": 1})
    with BundleWriter(tmp_path, "v1", overwrite=True) as w:
        w.add_json("new.json", {"b": 2})
    bundle = load_bundle(tmp_path / "v1")
    assert [e.path for e in bundle.manifest.files] == ["new.json"]
    assert not (tmp_path / "v1" / "old.json").exists()
    assert leftovers(tmp_path) == []


def test_exception_removes_staging_and_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(tmp_path, "v1") as w:
            w.add_json("metrics.json", {"auc": 0.5})
            w.add_npy("items/embeddings.npy", np.ones((2, 2)))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="not been committed"):
        _ = w.path


def test_invalid_content_fails_validation_and_cleans_up(tmp_path: Path) -> None:
    fake = tmp_path / "src" / "fake.npy"
    fake.parent.mkdir()
    fake.write_bytes(pickle.dumps(np.ones(3)))
    store = tmp_path / "store"
    with pytest.raises(BundleError, match="pickled"):
        with BundleWriter(store, "v1") as w:
            w.add_file("items/embeddings.npy", fake)
    assert list(store.iterdir()) == []


def test_files_written_behind_the_writers_back_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not listed"):
        with BundleWriter(tmp_path, "v1") as w:
            w.add_json("metrics.json", {})
            (w.staging / "stray.json").write_text("{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", ["../x", "a..b", ".hidden", "a/b", ""])
def test_bad_version_refused(tmp_path: Path, version: str) -> None:
    with pytest.raises(BundleError, match="is not valid"):
        BundleWriter(tmp_path, version)
    assert list(tmp_path.iterdir()) == []


def test_path_and_kind_checks(tmp_path: Path) -> None:
    source = tmp_path / "model.pkl"
    source.write_bytes(pickle.dumps({}))
    store = tmp_path / "store"
    with BundleWriter(store, "v1") as w:
        with pytest.raises(BundleError, match="pickle files are not accepted"):
            w.add_file("model.pkl", source)
        with pytest.raises(BundleError, match="'..'"):
            w.add_json("../escape.json", {})
        with pytest.raises(BundleError, match="absolute"):
            w.add_json("/tmp/abs.json", {})
        with pytest.raises(BundleError, match=r"expected a \.npy path"):
            w.add_npy("items/embeddings.json", np.ones(2))
        with pytest.raises(BundleError, match="cannot list itself"):
            w.add_json(MANIFEST_NAME, {})
        w.add_json("a.json", {})
        with pytest.raises(BundleError, match="already added"):
            w.add_json("a.json", {})
    assert [e.path for e in load_bundle(w.path).manifest.files] == ["a.json"]
    assert not (store / "escape.json").exists() and not (tmp_path / "escape.json").exists()


def test_value_checks(tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    (tmp_path / "target.json").write_text("{}")
    store = tmp_path / "store"
    with BundleWriter(store, "v1") as w:
        with pytest.raises(BundleError, match="object arrays"):
            w.add_npy("o.npy", np.array([{"a": 1}], dtype=object))
        with pytest.raises(BundleError, match="standard JSON"):
            w.set_metrics({"auc": float("nan")})
        with pytest.raises(BundleError, match="standard JSON"):
            w.add_json("bad.json", {"x": object()})
        with pytest.raises(BundleError, match="torch.Tensor"):
            w.add_safetensors("w.safetensors", {"w": np.ones(2)})  # type: ignore[dict-item]
        with pytest.raises(BundleError, match="not a regular file"):
            w.add_file("copy.json", link)
        with pytest.raises(BundleError, match="does not exist"):
            w.add_file("copy2.json", tmp_path / "absent.json")
        with pytest.raises(BundleError, match="parents"):
            w.set_parents(["../v0"])
        w.add_json("ok.json", [1, 2])
    assert load_bundle(w.path).load_json("ok.json") == [1, 2]


def test_bad_component_name_fails_commit(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="component name"):
        with BundleWriter(tmp_path, "v1") as w:
            w.add_json("a.json", {})
            w.set_component("../crm", kind="x")
    assert list(tmp_path.iterdir()) == []


def test_writer_is_single_use(tmp_path: Path) -> None:
    w = BundleWriter(tmp_path, "v1")
    with pytest.raises(RuntimeError, match="inside 'with'"):
        w.add_json("a.json", {})
    with w:
        w.add_json("a.json", {})
    with pytest.raises(RuntimeError):
        w.add_json("b.json", {})
    with pytest.raises(RuntimeError):
        w.__enter__()


def test_manifest_is_standard_json(tmp_path: Path) -> None:
    path = write_simple(tmp_path, description="ünïcode")
    data = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert data["schema_version"] == 1 and data["description"] == "ünïcode"
    assert set(data) == {"schema_version", "version", "created_at", "description", "components",
                         "files", "metrics", "parents", "extra"}


def test_empty_bundle(tmp_path: Path) -> None:
    with BundleWriter(tmp_path, "empty") as w:
        pass
    assert load_bundle(w.path).manifest.files == []
