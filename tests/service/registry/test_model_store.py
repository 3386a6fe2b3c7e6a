"""The store's pointer and activation history: what restarts and rollbacks rely on."""

from __future__ import annotations

import json

import pytest

from service.registry.store import ModelStore, StoreError, UnknownVersion


def make_version(store: ModelStore, version: str) -> None:
    path = store.root / version
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "version": version, "created_at": "2026-01-01T00:00:00Z", "files": []}))


@pytest.fixture
def store(tmp_path) -> ModelStore:
    s = ModelStore(tmp_path / "store")
    for v in ("a", "b", "c"):
        make_version(s, v)
    return s


def test_versions_ignore_hidden_and_incomplete(store: ModelStore):
    (store.root / ".upload-x").mkdir()
    (store.root / "no-manifest").mkdir()
    assert sorted(store.versions()) == ["a", "b", "c"]


def test_activation_moves_pointer_and_rollback_pops(store: ModelStore):
    assert store.pointer() is None
    store.record_activation("a")
    store.record_activation("b")
    store.record_activation("c")
    assert store.pointer() == "c"
    assert store.previous("c") == "b"
    store.record_activation("b", rollback=True)
    assert store.pointer() == "b"
    assert [e["version"] for e in store.history()] == ["a", "b"]
    assert store.previous("b") == "a"


def test_previous_skips_deleted_versions(store: ModelStore):
    for v in ("a", "b", "c"):
        store.record_activation(v)
    store.delete("b", active="c")
    assert store.previous("c") == "a"
    assert not store.exists("b")


def test_delete_refuses_active_and_unknown(store: ModelStore):
    with pytest.raises(StoreError, match="active"):
        store.delete("a", active="a")
    with pytest.raises(UnknownVersion):
        store.delete("zzz", active="a")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "a..b"])
def test_version_names_cannot_escape(store: ModelStore, bad: str):
    with pytest.raises(ValueError):
        store.path(bad)


def test_corrupt_history_reads_as_empty(store: ModelStore):
    (store.root / ".activations.json").write_text("{not json")
    assert store.history() == []
