"""Write a model bundle into a staging directory and publish it atomically once it validates.

Used by the offline exporter and by the running service, which derives new versions from pushed
parts (a new LoRA set or CRM checkpoint on top of the active bundle).

Readers of the store never see a half-written bundle: files go to ``<store>/.staging-<uuid>/``,
the manifest is written last, the result is checked with the runtime's own reader, and only
then is the directory renamed to ``<store>/<version>``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from service.bundle import (
    MANIFEST_NAME,
    BundleError,
    BundleManifest,
    ComponentInfo,
    FileEntry,
    file_sha256,
    load_bundle,
    validate_relpath,
    validate_version,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import torch

STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".replaced-"


def _json_bytes(obj: Any, what: str) -> bytes:
    """Standard JSON (no NaN/Infinity), which is all the reader accepts."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{what}: cannot be written as standard JSON ({exc})") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleWriter:
    """Collects files and manifest fields for one bundle version; publishes on clean ``with`` exit.

    On an exception inside the ``with`` block the staging directory is removed and nothing is
    published. ``path`` is the published directory once the writer has committed.
    """

    def __init__(self, store_dir: str | os.PathLike[str], version: str, *, description: str = "",
                 overwrite: bool = False) -> None:
        try:
            self.version = validate_version(version)
        except ValueError as exc:
            raise BundleError(str(exc)) from None
        self.store_dir = Path(store_dir)
        self.description = description
        self.overwrite = overwrite
        self.staging = self.store_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        self._files: set[str] = set()
        self._components: dict[str, ComponentInfo] = {}
        self._metrics: dict[str, Any] = {}
        self._parents: list[str] = []
        self._extra: dict[str, Any] = {}
        self._state = "new"  # new -> open -> committed | aborted
        self._final: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def target(self) -> Path:
        """Where the bundle will be published."""
        return self.store_dir / self.version

    @property
    def path(self) -> Path:
        """The published bundle directory; only available after a successful commit."""
        if self._final is None:
            raise RuntimeError(f"bundle {self.version} has not been committed")
        return self._final

    def __enter__(self) -> BundleWriter:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.commit()

    def open(self) -> None:
        """Create the staging directory; fails early if the version is already published."""
        if self._state != "new":
            raise RuntimeError(f"bundle writer for {self.version} is already {self._state}")
        self._refuse_existing()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        self._state = "open"

    def abort(self) -> None:
        """Discard everything written so far."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._state != "committed":
            self._state = "aborted"

    def commit(self) -> Path:
        """Hash files, write the manifest, validate with the runtime reader, publish atomically."""
        self._require_open()
        try:
            self._write_manifest()
            load_bundle(self.staging, expect_dir_name=False)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._final = self.target
        return self._final

    # -- files -----------------------------------------------------------------------------

    def add_json(self, rel: str, obj: Any) -> Path:
        """Write ``obj`` as standard JSON (sorted keys, no NaN)."""
        data = _json_bytes(obj, rel)
        return self._add(rel, ".json", lambda dest: dest.write_bytes(data))

    def add_safetensors(self, rel: str, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
        """Write tensors as safetensors; CPU contiguous copies, so views and shared storage are fine."""
        import torch
        from safetensors.torch import save_file

        clean: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise BundleError(f"{rel}: expected str -> torch.Tensor, got {type(name).__name__} -> {type(tensor).__name__}")
            clean[name] = tensor.detach().to("cpu").contiguous().clone()
        return self._add(rel, ".safetensors", lambda dest: save_file(clean, str(dest), metadata=metadata))

    def add_npy(self, rel: str, array: np.ndarray) -> Path:
        """Write an array as ``.npy``; object arrays are refused because they need pickle."""
        arr = np.asarray(array)
        if arr.dtype.hasobject:
            raise BundleError(f"{rel}: object arrays are not accepted (they are stored as pickle)")

        def write(dest: Path) -> None:
            with open(dest, "wb") as f:  # a file object, so numpy does not alter the name
                np.save(f, arr, allow_pickle=False)

        return self._add(rel, ".npy", write)

    def add_parquet(self, rel: str, data: pd.DataFrame | pa.Table) -> Path:
        """Write a pandas DataFrame or Arrow table as parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data)
        return self._add(rel, ".parquet", lambda dest: pq.write_table(table, dest))

    def add_file(self, rel: str, source: str | os.PathLike[str]) -> Path:
        """Copy an existing regular file (not a symlink) whose kind matches ``rel``'s suffix."""
        src = Path(source)
        try:
            mode = src.lstat().st_mode
        except FileNotFoundError:
            raise BundleError(f"{rel}: source {src} does not exist") from None
        if not stat.S_ISREG(mode):
            raise BundleError(f"{rel}: source {src} is not a regular file (symlinks are not accepted)")
        return self._add(rel, PurePosixPath(rel).suffix, lambda dest: shutil.copyfile(src, dest, follow_symlinks=False))

    # -- manifest fields -------------------------------------------------------------------

    def set_component(self, name: str, *, kind: str, config: dict[str, Any] | None = None) -> None:
        """Describe a named group of files (e.g. ``crm``) with a small, JSON-able config."""
        self._require_open()
        config = dict(config or {})
        _json_bytes(config, f"component {name!r} config")
        try:
            self._components[name] = ComponentInfo(kind=kind, config=config)
        except ValidationError as exc:
            raise BundleError(f"component {name!r}: {exc.errors()[0]['msg']}") from None

    def set_metrics(self, metrics: dict[str, Any]) -> None:
        """Evaluation results recorded with the bundle (standard JSON values only)."""
        self._require_open()
        _json_bytes(metrics, "metrics")
        self._metrics = dict(metrics)

    def set_parents(self, parents: list[str]) -> None:
        """Versions this bundle was derived from."""
        self._require_open()
        try:
            self._parents = [validate_version(p) for p in parents]
        except ValueError as exc:
            raise BundleError(f"parents: {exc}") from None

    def set_extra(self, extra: dict[str, Any]) -> None:
        """Free-form JSON-able notes that fit no other field."""
        self._require_open()
        _json_bytes(extra, "extra")
        self._extra = dict(extra)

    # -- internals -------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"bundle writer for {self.version} is {self._state}; use it inside 'with'")

    def _add(self, rel: str, suffix: str, write: Callable[[Path], object]) -> Path:
        """Check ``rel`` for a file of kind ``suffix``, write it, and list it only if writing succeeded."""
        self._require_open()
        try:
            validate_relpath(rel)
        except ValueError as exc:
            raise BundleError(str(exc)) from None
        if PurePosixPath(rel).suffix != suffix:
            raise BundleError(f"{rel!r}: expected a {suffix} path for this kind of data")
        if rel.casefold() in {f.casefold() for f in self._files}:
            raise BundleError(f"{rel!r}: already added to bundle {self.version}")
        dest = self.staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(dest)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        self._files.add(rel)
        return dest

    def _refuse_existing(self) -> None:
        if not self.overwrite and os.path.lexists(self.target):
            raise BundleError(f"bundle {self.version} already exists in {self.store_dir}; pass overwrite=True to replace it")

    def _write_manifest(self) -> None:
        entries = []
        for rel in sorted(self._files):
            full = self.staging / rel
            _fsync(full)
            entries.append(FileEntry(path=rel, sha256=file_sha256(full), size=full.stat().st_size))
        try:
            manifest = BundleManifest(
                schema_version=1, version=self.version, created_at=datetime.now(timezone.utc),
                description=self.description, components=self._components, files=entries,
                metrics=self._metrics, parents=self._parents, extra=self._extra,
            )
        except ValidationError as exc:
            raise BundleError(f"bundle {self.version}: manifest is invalid: {exc}") from None
        data = _json_bytes(manifest.model_dump(mode="json"), MANIFEST_NAME)
        with open(self.staging / MANIFEST_NAME, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for directory in {(self.staging / rel).parent for rel in self._files} | {self.staging}:
            _fsync(directory)

    def _publish(self) -> None:
        """Rename staging into place; an overwritten version is moved aside first, then deleted."""
        self._refuse_existing()
        trash = None
        if os.path.lexists(self.target):
            trash = self.store_dir / f"{_TRASH_PREFIX}{self.version}-{uuid.uuid4().hex}"
            os.rename(self.target, trash)
        try:
            os.rename(self.staging, self.target)
        except OSError as exc:
            if trash is not None:
                os.rename(trash, self.target)
            raise BundleError(f"bundle {self.version}: cannot publish to {self.target} ({exc.strerror or exc})") from None
        _fsync(self.store_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
