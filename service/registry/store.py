"""The model store on disk: bundle directories, the ACTIVE pointer and the activation history.

Layout (``model_store/``): one directory per version (named by its manifest's version),
``ACTIVE`` naming the version served after a restart, ``.activations.json``, the stack of
activated versions that rollback pops, and ``CANARY``, the last canary (candidate, share of
users, shadow or not, running, promoted or aborted and why). Every file is replaced atomically
(write, fsync, rename), so a crash leaves either the old or the new state, never a torn file.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.bundle import MANIFEST_NAME, BundleManifest, validate_version

ACTIVE_POINTER = "ACTIVE"
ACTIVATIONS = ".activations.json"
CANARY_STATE = "CANARY"
TRASH_PREFIX = ".deleted-"
MAX_HISTORY = 100


class StoreError(ValueError):
    """A store operation that cannot be done as asked (deleting the active version, no previous one)."""


class UnknownVersion(StoreError):
    """The version is not in the store."""


class CanaryState(BaseModel):
    """The canary as the store records it; every gateway sharing the store routes by it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: str
    stable: str = Field(description="The version active when the canary started.")
    percent: float = Field(gt=0, le=100, description="Share of users assigned to the candidate.")
    shadow: bool = Field(False, description="Scored beside the stable version and recorded, never served.")
    status: Literal["running", "promoted", "aborted"] = "running"
    started_at: str
    ended_at: str | None = None
    ended_by: Literal["operator", "guard"] | None = None
    reason: str | None = Field(None, description="Why it was aborted.")
    rail: str | None = Field(None, description="The guard rail that aborted it.")

    @property
    def running(self) -> bool:
        return self.status == "running"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()  # guards the pointer and history files within this process

    def path(self, version: str) -> Path:
        """The directory of ``version``; the name is validated, so it cannot leave the store."""
        return self.root / validate_version(version)

    def exists(self, version: str) -> bool:
        return (self.path(version) / MANIFEST_NAME).is_file()

    def versions(self) -> list[str]:
        """Versions with a manifest, oldest first (by directory modification time)."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir()
                if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()]
        return [p.name for p in sorted(dirs, key=lambda p: (p.stat().st_mtime, p.name))]

    def manifest(self, version: str) -> BundleManifest:
        """The manifest as written (schema-checked, hashes not verified: listing must be cheap)."""
        if not self.exists(version):
            raise UnknownVersion(f"version {version!r} is not in the store")
        return BundleManifest.model_validate_json((self.path(version) / MANIFEST_NAME).read_bytes())

    def pointer(self) -> str | None:
        pointer = self.root / ACTIVE_POINTER
        return pointer.read_text().strip() or None if pointer.is_file() else None

    def canary(self) -> CanaryState | None:
        """The last canary recorded (running or ended), None when there never was one or the file
        is unreadable (logged by the caller as no canary: routing falls back to the stable)."""
        path = self.root / CANARY_STATE
        if not path.is_file():
            return None
        try:
            return CanaryState.model_validate_json(path.read_bytes())
        except (ValidationError, OSError):
            return None

    def write_canary(self, state: CanaryState) -> None:
        validate_version(state.candidate)
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.root / CANARY_STATE, state.model_dump_json(indent=1).encode())

    def history(self) -> list[dict[str, str]]:
        """Activations, oldest first: ``{"version", "at"}``."""
        path = self.root / ACTIVATIONS
        if not path.is_file():
            return []
        try:
            entries = json.loads(path.read_text())
        except ValueError:
            return []
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("version"), str)]

    def record_activation(self, version: str, *, rollback: bool = False) -> None:
        """Point ACTIVE at ``version``; push it on the history, or pop the current one on rollback."""
        validate_version(version)
        with self._lock:
            entries = self.history()
            if rollback and entries:
                entries.pop()
            if not entries or entries[-1]["version"] != version:
                entries.append({"version": version, "at": utc_now()})
            self.root.mkdir(parents=True, exist_ok=True)
            self._write_history(entries)
            _write_atomic(self.root / ACTIVE_POINTER, f"{version}\n".encode())

    def previous(self, current: str) -> str | None:
        """The version active before ``current`` that is still in the store, or None."""
        entries = [e["version"] for e in self.history()]
        while entries and entries[-1] == current:
            entries.pop()
        for version in reversed(entries):
            if version != current and self.exists(version):
                return version
        return None

    def delete(self, version: str, *, active: str | None) -> None:
        """Remove an inactive version: renamed aside first (atomic), then deleted."""
        if version == active:
            raise StoreError(f"version {version!r} is active; activate another version before deleting it")
        if not self.exists(version):
            raise UnknownVersion(f"version {version!r} is not in the store")
        trash = self.root / f"{TRASH_PREFIX}{version}-{uuid.uuid4().hex}"
        os.rename(self.path(version), trash)
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._write_history([e for e in self.history() if e["version"] != version])

    def _write_history(self, entries: list[dict[str, str]]) -> None:
        _write_atomic(self.root / ACTIVATIONS, json.dumps(entries[-MAX_HISTORY:], indent=1).encode())
