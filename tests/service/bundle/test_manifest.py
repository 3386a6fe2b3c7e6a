"""Schema rules of manifest.json: every path-like field is checked before the reader touches disk."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.bundle import ALLOWED_SUFFIXES, MANIFEST_NAME, BundleManifest, validate_relpath, validate_version

SHA = "ab" * 32


def manifest(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema_version": 1,
        "version": "v1",
        "created_at": "2025-01-01T00:00:00Z",
        "components": {"crm": {"kind": "sim-din", "config": {"dim": 8}}},
        "files": [{"path": "crm/config.json", "sha256": SHA, "size": 10}],
    }
    data.update(overrides)
    return data


def file_entry(path: str, **overrides: Any) -> dict[str, Any]:
    return {"path": path, "sha256": SHA, "size": 1, **overrides}


def error_text(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        BundleManifest.model_validate(data)
    return str(info.value)


def test_valid_manifest_parses_with_defaults() -> None:
    m = BundleManifest.model_validate(manifest())
    assert m.version == "v1"
    assert m.created_at.year == 2025
    assert m.components["crm"].kind == "sim-din"
    assert m.components["crm"].config == {"dim": 8}
    assert m.files[0].path == "crm/config.json"
    assert (m.description, m.metrics, m.parents, m.extra) == ("", {}, [], {})
    assert m.entry("crm/config.json") is m.files[0]
    assert m.entry("missing.json") is None


def test_constants() -> None:
    assert MANIFEST_NAME == "manifest.json"
    assert ALLOWED_SUFFIXES == {".safetensors", ".npy", ".json", ".parquet"}


@pytest.mark.parametrize("path", [
    "metrics.json", "crm/weights.safetensors", "items/embeddings.npy", "maps/users.parquet",
    "lora/meta_lora.safetensors", "a/b/c/d.v2_final-1.json",
])
def test_good_paths_accepted(path: str) -> None:
    assert validate_relpath(path) == path
    BundleManifest.model_validate(manifest(files=[file_entry(path)]))


@pytest.mark.parametrize(("path", "expected"), [
    ("../x.json", "has a '..' segment"),
    ("crm/../../x.json", "has a '..' segment"),
    ("./x.json", "has a '.' segment"),
    ("/etc/x.json", "absolute"),
    ("crm\\x.json", "backslash"),
    ("crm//x.json", "has an empty segment"),
    ("crm/", "has an empty segment"),
    ("", "empty"),
    (".hidden.json", "starting with a letter or digit"),
    ("crm/we ights.json", "segment"),
    ("crm/x.json\n", "segment"),
    ("model.pkl", "pickle files are not accepted"),
    ("model.pt", "pickle files are not accepted"),
    ("model.bin", "pickle files are not accepted"),
    ("model.pickle", "pickle files are not accepted"),
    ("run.py", "not accepted"),
    ("README", "not accepted"),
    ("x.NPY", "not accepted"),
    (MANIFEST_NAME, "cannot list itself"),
    ("a" * 129 + ".json", "segment"),
])
def test_bad_paths_refused(path: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_relpath(path)
    assert expected in str(info.value)
    assert expected in error_text(manifest(files=[file_entry(path)]))


@pytest.mark.parametrize("version", ["v1", "2025-01-01_a", "A.b-c_d", "x" * 64])
def test_good_versions(version: str) -> None:
    assert validate_version(version) == version
    assert BundleManifest.model_validate(manifest(version=version)).version == version


@pytest.mark.parametrize("version", ["../x", "..", ".", "a..b", "-v1", ".v1", "v/1", "v 1", "", "x" * 65, "v1\n"])
def test_bad_versions_refused(version: str) -> None:
    assert "is not valid" in error_text(manifest(version=version))


def test_parents_are_versions() -> None:
    assert BundleManifest.model_validate(manifest(parents=["v0", "base-2"])).parents == ["v0", "base-2"]
    assert "'../v0'" in error_text(manifest(parents=["../v0"]))


@pytest.mark.parametrize("sha", ["AB" * 32, "ab" * 31, "g" * 64, "ab" * 33, ""])
def test_bad_sha256_refused(sha: str) -> None:
    assert "64 lowercase hex" in error_text(manifest(files=[file_entry("x.json", sha256=sha)]))


@pytest.mark.parametrize("size", [-1, True, "10", 1.5])
def test_bad_size_refused(size: Any) -> None:
    assert "size" in error_text(manifest(files=[file_entry("x.json", size=size)]))


def test_unknown_fields_refused_at_every_level() -> None:
    assert "Extra inputs are not permitted" in error_text(manifest(bogus=1))
    assert "files.0.mode" in error_text(manifest(files=[file_entry("x.json", mode="exec")]))
    assert "components.crm.loader" in error_text(manifest(components={"crm": {"kind": "k", "loader": "x"}}))


@pytest.mark.parametrize("value", [2, 0, True, "1"])
def test_schema_version_must_be_integer_one(value: Any) -> None:
    assert "schema_version" in error_text(manifest(schema_version=value))


def test_required_fields() -> None:
    for field in ("schema_version", "version", "created_at", "files"):
        data = manifest()
        del data[field]
        assert field in error_text(data)


def test_duplicate_paths_refused() -> None:
    assert "listed more than once" in error_text(manifest(files=[file_entry("a.json"), file_entry("a.json")]))
    # Same name in a different case collides on case-insensitive filesystems.
    assert "listed more than once" in error_text(manifest(files=[file_entry("a.json"), file_entry("A.json")]))


def test_file_under_a_listed_file_refused() -> None:
    text = error_text(manifest(files=[file_entry("a.json"), file_entry("a.json/b.json")]))
    assert "lies under the listed file" in text


@pytest.mark.parametrize("name", ["../crm", "", "a/b", ".x"])
def test_bad_component_names_refused(name: str) -> None:
    assert "component name" in error_text(manifest(components={name: {"kind": "k"}}))


def test_component_kind_required() -> None:
    assert "kind" in error_text(manifest(components={"crm": {"config": {}}}))
