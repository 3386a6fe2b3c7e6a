"""The canary state in the store: written atomically beside ACTIVE, read back after a restart."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from service.registry.store import CANARY_STATE, CanaryState, ModelStore, utc_now


def state(**changes) -> CanaryState:
    values = dict(candidate="v2", stable="v1", percent=25.0, shadow=True, started_at=utc_now())
    values.update(changes)
    return CanaryState(**values)


def test_a_written_state_reads_back_in_a_new_store_object(tmp_path):
    ModelStore(tmp_path).write_canary(state())
    read = ModelStore(tmp_path).canary()  # as a restarted gateway reads it
    assert read == state(started_at=read.started_at) and read.running
    ended = read.model_copy(update={"status": "aborted", "ended_by": "guard", "reason": "online AUC",
                                    "rail": "online_auc"})
    ModelStore(tmp_path).write_canary(ended)
    assert ModelStore(tmp_path).canary() == ended and not ended.running


def test_the_write_replaces_the_file_atomically(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    store.write_canary(state())
    before = (tmp_path / CANARY_STATE).read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_canary(state(percent=90.0))
    assert (tmp_path / CANARY_STATE).read_bytes() == before  # the old state, whole
    assert store.canary().percent == 25.0


def test_no_file_or_a_torn_one_is_no_canary(tmp_path):
    assert ModelStore(tmp_path).canary() is None
    (tmp_path / CANARY_STATE).write_text('{"candidate": "v2", "perc')
    assert ModelStore(tmp_path).canary() is None


@pytest.mark.parametrize("changes", [{"percent": 0}, {"percent": 101}, {"status": "paused"}, {"extra": 1}])
def test_invalid_states_are_refused(changes):
    with pytest.raises(ValidationError):
        state(**changes)


def test_versions_ignore_the_state_file(tmp_path):
    store = ModelStore(tmp_path)
    store.write_canary(state())
    assert store.versions() == []
