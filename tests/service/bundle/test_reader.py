"""The reader loads honest bundles and refuses every kind of tampering with a message naming the cause."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_tensors

from service.bundle import MANIFEST_NAME, Bundle, BundleError, BundleManifest, file_sha256, load_bundle

TENSORS = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor([1, 2, 3], dtype=torch.int64)}
EMBEDDINGS = np.arange(15, dtype=np.float32).reshape(5, 3) / 7
CATALOG = pd.DataFrame({"item_idx": [1, 2, 3], "title": ["a", "b", "c"], "year": [1999.0, None, 2005.0]})
CONFIG = {"dim": 8, "layers": [64, 32], "name": "crm"}


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df), buf)
    return buf.getvalue()


def standard_files() -> dict[str, bytes]:
    return {
        "crm/config.json": json.dumps(CONFIG).encode(),
        "crm/weights.safetensors": save_tensors(TENSORS),
        "items/embeddings.npy": npy_bytes(EMBEDDINGS),
        "items/catalog.parquet": parquet_bytes(CATALOG),
        "metrics.json": b'{"auc": 0.75}',
    }


def entry_for(rel: str, data: bytes) -> dict[str, Any]:
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def edit_manifest(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    change(data)
    write_manifest(root, data)


def make_bundle(store: Path, version: str = "v1", files: dict[str, bytes] | None = None) -> Path:
    """A valid bundle written by hand, independent of the training-side writer."""
    files = standard_files() if files is None else files
    root = store / version
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    write_manifest(root, {
        "schema_version": 1,
        "version": version,
        "created_at": "2025-01-01T00:00:00+00:00",
        "description": "test bundle",
        "components": {"crm": {"kind": "sim-din", "config": {"dim": 8}}, "items": {"kind": "catalog"}},
        "files": [entry_for(rel, data) for rel, data in files.items()],
        "metrics": {"auc": 0.75},
    })
    return root


def replace_file(root: Path, rel: str, data: bytes) -> None:
    """Change a file and update its manifest entry so only deeper checks can catch it."""
    (root / rel).write_bytes(data)

    def change(m: dict[str, Any]) -> None:
        m["files"] = [e for e in m["files"] if e["path"] != rel] + [entry_for(rel, data)]

    edit_manifest(root, change)


def refused(root: Path, **kwargs: Any) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(root, **kwargs)
    return str(info.value)


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "store")


# ------------------------------------------------------------------------------------------
# Honest bundles


def test_round_trip_values_and_hashes(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle.manifest, BundleManifest)
    assert bundle.version == "v1" and bundle.root == bundle_dir
    assert bundle.manifest.components["crm"].config == {"dim": 8}

    tensors = bundle.load_safetensors("crm/weights.safetensors")
    assert set(tensors) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert torch.equal(tensors[name], tensor)
    np.testing.assert_array_equal(bundle.load_npy("items/embeddings.npy"), EMBEDDINGS)
    pd.testing.assert_frame_equal(bundle.load_parquet_pandas("items/catalog.parquet"), CATALOG)
    assert bundle.load_parquet("items/catalog.parquet", columns=["title"]).column_names == ["title"]
    assert bundle.load_json("crm/config.json") == CONFIG

    for rel, data in standard_files().items():
        entry = bundle.manifest.entry(rel)
        assert entry is not None
        assert entry.sha256 == hashlib.sha256(data).hexdigest() == file_sha256(bundle.path(rel))
        assert entry.size == len(data)


def test_npy_can_be_memory_mapped(bundle_dir: Path) -> None:
    arr = load_bundle(bundle_dir).load_npy("items/embeddings.npy", mmap=True)
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    np.testing.assert_array_equal(arr, EMBEDDINGS)


def test_empty_and_scalar_arrays_and_empty_safetensors(tmp_path: Path) -> None:
    files = {"e.npy": npy_bytes(np.zeros((0, 4), np.float32)), "s.npy": npy_bytes(np.float64(3.5)),
             "t.safetensors": save_tensors({})}
    bundle = load_bundle(make_bundle(tmp_path, files=files))
    assert bundle.load_npy("e.npy").shape == (0, 4)
    assert bundle.load_npy("s.npy") == 3.5
    assert bundle.load_safetensors("t.safetensors") == {}


def test_path_only_for_listed_files(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.path("metrics.json") == bundle_dir / "metrics.json"
    for rel in ("other.json", MANIFEST_NAME, "../v1/metrics.json"):
        with pytest.raises(BundleError, match="not listed"):
            bundle.path(rel)


def test_loaders_check_the_kind(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match=r"not a \.npy file"):
        bundle.load_npy("crm/config.json")
    with pytest.raises(BundleError, match=r"not a \.safetensors file"):
        bundle.load_safetensors("items/embeddings.npy")
    with pytest.raises(BundleError, match=r"not a \.parquet file"):
        bundle.load_parquet("metrics.json")
    with pytest.raises(BundleError, match=r"not a \.json file"):
        bundle.load_json("items/catalog.parquet")


def test_version_must_match_directory_unless_disabled(tmp_path: Path) -> None:
    root = make_bundle(tmp_path, version="v1")
    staged = root.rename(tmp_path / ".staging-abc")
    assert "does not match the directory name" in refused(staged)
    assert load_bundle(staged, expect_dir_name=False).version == "v1"


# ------------------------------------------------------------------------------------------
# Directory and manifest


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in refused(tmp_path / "nope")


def test_bundle_directory_symlink_refused(bundle_dir: Path, tmp_path: Path) -> None:
    link = tmp_path / "v2"
    link.symlink_to(bundle_dir, target_is_directory=True)
    assert "symlink" in refused(link, expect_dir_name=False)


def test_missing_manifest(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).unlink()
    assert "manifest.json: file is missing" in refused(bundle_dir)


def test_manifest_symlink_refused(bundle_dir: Path, tmp_path: Path) -> None:
    real = tmp_path / "real-manifest.json"
    (bundle_dir / MANIFEST_NAME).rename(real)
    (bundle_dir / MANIFEST_NAME).symlink_to(real)
    assert "symlink" in refused(bundle_dir)


def test_manifest_not_json(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).write_text("{'version': 'v1',")
    message = refused(bundle_dir)
    assert "manifest.json" in message and "not valid JSON" in message


def test_manifest_not_utf8(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).write_bytes(b'{"version": "\xff"}')
    assert "not valid UTF-8" in refused(bundle_dir)


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": 1, "a": 2}', "[" * 100_000 + "]" * 100_000])
def test_manifest_nonstandard_json_refused(bundle_dir: Path, text: str) -> None:
    (bundle_dir / MANIFEST_NAME).write_text(text)
    assert "manifest.json" in refused(bundle_dir)


def test_oversized_manifest(bundle_dir: Path) -> None:
    edit_manifest(bundle_dir, lambda m: m.update(description="x" * (1 << 20)))
    assert "over the 1048576-byte limit" in refused(bundle_dir)
    assert "over the 100-byte limit" in refused(bundle_dir, max_manifest_bytes=100)


def test_manifest_unknown_field(bundle_dir: Path) -> None:
    edit_manifest(bundle_dir, lambda m: m.update(loader="pickle"))
    message = refused(bundle_dir)
    assert "does not match the manifest schema" in message
    assert "loader: Extra inputs are not permitted" in message


def test_manifest_bad_version_name(bundle_dir: Path) -> None:
    edit_manifest(bundle_dir, lambda m: m.update(version="../x"))
    message = refused(bundle_dir, expect_dir_name=False)
    assert "version" in message and "'../x'" in message


def test_manifest_schema_errors_are_summarised(bundle_dir: Path) -> None:
    edit_manifest(bundle_dir, lambda m: m.update(files=[{"path": f"../{i}.json"} for i in range(20)]))
    message = refused(bundle_dir)
    assert "and " in message and "more" in message
    assert len(message) < 2000


# ------------------------------------------------------------------------------------------
# File listing


@pytest.mark.parametrize("listed", [False, True])
def test_pickle_file_refused(bundle_dir: Path, listed: bool) -> None:
    data = pickle.dumps({"w": [1, 2, 3]})
    (bundle_dir / "crm" / "model.pkl").write_bytes(data)
    if listed:
        edit_manifest(bundle_dir, lambda m: m["files"].append(entry_for("crm/model.pkl", data)))
    message = refused(bundle_dir)
    assert "pickle files are not accepted" in message and "model.pkl" in message


@pytest.mark.parametrize("name", ["weights.pt", "model.bin", "state.pickle", "hook.py"])
def test_other_disallowed_files_refused_even_unlisted(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).write_bytes(b"payload")
    message = refused(bundle_dir)
    assert name in message and "not accepted" in message


def test_unlisted_extra_file(bundle_dir: Path) -> None:
    (bundle_dir / "items" / "extra.json").write_text("{}")
    message = refused(bundle_dir)
    assert "items/extra.json" in message and "not listed" in message


def test_missing_listed_file(bundle_dir: Path) -> None:
    (bundle_dir / "items" / "embeddings.npy").unlink()
    message = refused(bundle_dir)
    assert "items/embeddings.npy" in message and "missing" in message


@pytest.mark.parametrize(("path", "expected"), [("../x.json", "'..'"), ("/tmp/x.json", "absolute")])
def test_entry_escaping_the_bundle(bundle_dir: Path, path: str, expected: str) -> None:
    data = b"{}"
    (bundle_dir.parent / "x.json").write_bytes(data)  # a real target, so only the schema can stop it
    edit_manifest(bundle_dir, lambda m: m["files"].append(entry_for(path, data)))
    message = refused(bundle_dir)
    assert expected in message and "files.5.path" in message


def test_symlink_to_outside_file(bundle_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.json"
    outside.write_bytes((bundle_dir / "metrics.json").read_bytes())  # same content, same hash
    (bundle_dir / "metrics.json").unlink()
    (bundle_dir / "metrics.json").symlink_to(outside)
    message = refused(bundle_dir)
    assert "metrics.json" in message and "symlink" in message


def test_symlinked_directory(bundle_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-items"
    (bundle_dir / "items").rename(outside)
    (bundle_dir / "items").symlink_to(outside, target_is_directory=True)
    message = refused(bundle_dir)
    assert "'items'" in message and "symlink" in message


def test_dangling_symlink(bundle_dir: Path) -> None:
    (bundle_dir / "ghost.json").symlink_to(bundle_dir / "nowhere.json")
    assert "symlink" in refused(bundle_dir)


def test_wrong_sha256(bundle_dir: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["files"][0]["sha256"] = "0" * 64

    edit_manifest(bundle_dir, change)
    message = refused(bundle_dir)
    assert "crm/config.json" in message and "sha256 does not match" in message


def test_modified_content_same_size(bundle_dir: Path) -> None:
    path = bundle_dir / "crm" / "config.json"
    data = bytearray(path.read_bytes())
    data[2] ^= 1
    path.write_bytes(bytes(data))
    assert "sha256 does not match" in refused(bundle_dir)


def test_wrong_size(bundle_dir: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["files"][0]["size"] += 1

    edit_manifest(bundle_dir, change)
    message = refused(bundle_dir)
    assert "crm/config.json" in message and "size is" in message


# ------------------------------------------------------------------------------------------
# File formats (hash and size updated, so only the format check can catch these)


def test_truncated_safetensors(bundle_dir: Path) -> None:
    data = (bundle_dir / "crm" / "weights.safetensors").read_bytes()
    replace_file(bundle_dir, "crm/weights.safetensors", data[:-7])
    message = refused(bundle_dir)
    assert "crm/weights.safetensors" in message and "truncated" in message


def test_safetensors_header_cut_off(bundle_dir: Path) -> None:
    data = (bundle_dir / "crm" / "weights.safetensors").read_bytes()
    replace_file(bundle_dir, "crm/weights.safetensors", data[:20])
    assert "truncated" in refused(bundle_dir)


def test_safetensors_with_bad_dtype_size(bundle_dir: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    data = len(header).to_bytes(8, "little") + header + b"\0" * 8  # 3 floats need 12 bytes
    replace_file(bundle_dir, "crm/weights.safetensors", data)
    assert "not a valid safetensors file" in refused(bundle_dir)


def test_pickle_renamed_to_npy(bundle_dir: Path) -> None:
    replace_file(bundle_dir, "items/embeddings.npy", pickle.dumps(np.ones(3)))
    message = refused(bundle_dir)
    assert "items/embeddings.npy" in message and "pickled" in message


def test_object_array_npy(bundle_dir: Path) -> None:
    replace_file(bundle_dir, "items/embeddings.npy", npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True))
    assert "object arrays are not accepted" in refused(bundle_dir)


def test_truncated_npy(bundle_dir: Path) -> None:
    replace_file(bundle_dir, "items/embeddings.npy", npy_bytes(EMBEDDINGS)[:-4])
    assert "truncated" in refused(bundle_dir)


def test_npy_loader_never_unpickles(bundle_dir: Path) -> None:
    """Defense in depth: even a file swapped after validation is loaded with allow_pickle=False."""
    bundle = load_bundle(bundle_dir)
    (bundle_dir / "items" / "embeddings.npy").write_bytes(pickle.dumps(np.ones(3)))
    with pytest.raises(BundleError, match="pickled"):
        Bundle(root=bundle.root, manifest=bundle.manifest).load_npy("items/embeddings.npy")


def test_not_parquet(bundle_dir: Path) -> None:
    replace_file(bundle_dir, "items/catalog.parquet", b"item_idx,title\n1,a\n2,b\n")
    assert "not a parquet file" in refused(bundle_dir)


def test_listed_json_must_parse(bundle_dir: Path) -> None:
    replace_file(bundle_dir, "metrics.json", b"{not json")
    message = refused(bundle_dir)
    assert "metrics.json" in message and "not valid JSON" in message


def test_error_is_a_value_error(bundle_dir: Path) -> None:
    (bundle_dir / "metrics.json").unlink()
    with pytest.raises(ValueError):
        load_bundle(bundle_dir)


def test_unreadable_special_file_refused(bundle_dir: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(bundle_dir / "pipe.json")
    assert "not a regular file" in refused(bundle_dir)
