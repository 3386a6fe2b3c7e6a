"""Open a model bundle directory only after proving it is exactly what its manifest says.

Bundles may come from outside (uploads), so nothing is loaded until the file set, sizes, hashes
and file formats all check out, and loaders never use pickle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from service.bundle.knowledge import knowledge_problem
from service.bundle.prototypes import prototypes_problem
from service.bundle.manifest import MANIFEST_NAME, BundleManifest, FileEntry, quote_untrusted, suffix_problem

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import torch

MAX_MANIFEST_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class BundleError(ValueError):
    """A bundle is missing, malformed or does not match its manifest; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Low-level helpers


def _open_regular(path: Path, label: str) -> tuple[IO[bytes], int]:
    """Open ``path`` for reading without following a final symlink; (file, size)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise BundleError(f"{label}: file is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{label}: is a symlink; symlinks are not accepted") from None
        raise BundleError(f"{label}: cannot open ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise BundleError(f"{label}: not a regular file")
    return os.fdopen(fd, "rb"), info.st_size


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks so large weights never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {quote_untrusted(key)}")
        out[key] = value
    return out


def parse_json_strict(data: bytes, label: str) -> Any:
    """Standard JSON only: UTF-8, no NaN/Infinity, no duplicate keys (ambiguous in hostile input)."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise BundleError(f"{label}: is not valid UTF-8") from None
    except RecursionError:
        raise BundleError(f"{label}: JSON is nested too deeply") from None
    except ValueError as exc:
        raise BundleError(f"{label}: is not valid JSON ({exc})") from None


def _describe_validation(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------
# Format checks: cheap, header-level proof that a file is what its suffix claims.


def verify_safetensors_header(path: str | os.PathLike[str], label: str | None = None) -> None:
    """Reject truncated or malformed safetensors files before anything maps them."""
    label = label or str(path)
    f, size = _open_regular(Path(path), label)
    with f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BundleError(f"{label}: safetensors file is truncated (no header length)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_SAFETENSORS_HEADER_BYTES or 8 + header_len > size:
            raise BundleError(f"{label}: safetensors header length {header_len} exceeds the file ({size} bytes); truncated?")
        header = parse_json_strict(f.read(header_len), f"{label} (safetensors header)")
    if not isinstance(header, dict):
        raise BundleError(f"{label}: safetensors header is not a JSON object")
    data_len = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise BundleError(f"{label}: tensor {quote_untrusted(name)} has invalid data_offsets")
        if offsets[1] > data_len:
            raise BundleError(f"{label}: tensor {quote_untrusted(name)} ends at byte {offsets[1]} "
                              f"but only {data_len} data bytes exist; truncated?")
        end_max = max(end_max, offsets[1])
    if end_max != data_len:
        raise BundleError(f"{label}: safetensors data is {data_len} bytes but tensors cover {end_max}")
    # Full validation (dtypes, shapes vs. byte ranges, overlaps) by the library's own parser.
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{label}: not a valid safetensors file ({exc})") from None


def verify_npy_header(path: str | os.PathLike[str], label: str | None = None) -> None:
    """Reject pickled data, object arrays and truncated ``.npy`` files without loading the data."""
    label = label or str(path)
    f, size = _open_regular(Path(path), label)
    with f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise BundleError(f"{label}: not an .npy array (pickled or other data is not accepted)") from None
        try:
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise BundleError(f"{label}: .npy format version {version} is not supported")
        except ValueError as exc:
            raise BundleError(f"{label}: malformed .npy header ({exc})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise BundleError(f"{label}: object arrays are not accepted (they are stored as pickle)")
    expected = offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise BundleError(f"{label}: .npy data is {size - offset} bytes, its header needs {expected - offset}; truncated?")


def verify_parquet_magic(path: str | os.PathLike[str], label: str | None = None) -> None:
    """Parquet files start and end with ``PAR1``; anything else (incl. encrypted files) is refused."""
    label = label or str(path)
    f, size = _open_regular(Path(path), label)
    with f:
        head = f.read(4)
        if size < 12:
            raise BundleError(f"{label}: too small to be a parquet file")
        f.seek(size - 4)
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise BundleError(f"{label}: not a parquet file (bad magic bytes); truncated?")


def verify_json_file(path: str | os.PathLike[str], label: str | None = None) -> None:
    """JSON files must parse as standard JSON."""
    label = label or str(path)
    f, _ = _open_regular(Path(path), label)
    with f:
        parse_json_strict(f.read(), label)


_FORMAT_CHECKS = {
    ".safetensors": verify_safetensors_header,
    ".npy": verify_npy_header,
    ".parquet": verify_parquet_magic,
    ".json": verify_json_file,
}


# ---------------------------------------------------------------------------------------------
# Validation steps of load_bundle, in order.


def _check_root(path: str | os.PathLike[str]) -> Path:
    root = Path(path)
    if root.is_symlink():
        raise BundleError(f"bundle {root}: is a symlink; point at the real directory")
    if not root.is_dir():
        raise BundleError(f"bundle {root}: directory does not exist")
    return root


def _read_manifest(root: Path, max_bytes: int) -> BundleManifest:
    label = f"{root.name}/{MANIFEST_NAME}"
    f, size = _open_regular(root / MANIFEST_NAME, label)
    with f:
        if size > max_bytes:
            raise BundleError(f"{label}: is {size} bytes, over the {max_bytes}-byte limit")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise BundleError(f"{label}: grew past the {max_bytes}-byte limit while reading")
    data = parse_json_strict(raw, label)
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{label}: does not match the manifest schema: {_describe_validation(exc)}") from None


def _check_disk_files(root: Path, manifest: BundleManifest) -> None:
    """Everything on disk is the manifest or a listed regular file; no symlinks, no pickles."""
    listed = {e.path for e in manifest.files}

    def fail(exc: OSError) -> None:
        raise BundleError(f"bundle {root.name}: cannot list {exc.filename} ({exc.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:
            if (base / name).is_symlink():
                rel = (base / name).relative_to(root).as_posix()
                raise BundleError(f"bundle {root.name}: {quote_untrusted(rel)} is a symlink; symlinks are not accepted")
        for name in filenames:
            full = base / name
            rel = full.relative_to(root).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"bundle {root.name}: {quote_untrusted(rel)} is a symlink; symlinks are not accepted")
            if not stat.S_ISREG(mode):
                raise BundleError(f"bundle {root.name}: {quote_untrusted(rel)} is not a regular file")
            if rel == MANIFEST_NAME:
                continue
            problem = suffix_problem(rel)
            if problem:
                raise BundleError(f"bundle {root.name}: {problem}")
            if rel not in listed:
                raise BundleError(f"bundle {root.name}: {quote_untrusted(rel)} is not listed in {MANIFEST_NAME}")


def _check_listed_file(root: Path, real_root: Path, entry: FileEntry) -> None:
    label = f"{root.name}/{entry.path}"
    full = root / entry.path
    if not full.resolve().is_relative_to(real_root):
        raise BundleError(f"{label}: resolves outside the bundle")
    f, size = _open_regular(full, label)
    with f:
        if size != entry.size:
            raise BundleError(f"{label}: size is {size} bytes, the manifest says {entry.size}")
        digest = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != entry.sha256:
        raise BundleError(f"{label}: sha256 does not match the manifest (file changed or corrupted)")
    _FORMAT_CHECKS[full.suffix](full, label)


def load_bundle(path: str | os.PathLike[str], *, expect_dir_name: bool = True,
                max_manifest_bytes: int = MAX_MANIFEST_BYTES) -> Bundle:
    """Validate the bundle at ``path`` and return it; raises BundleError on the first problem.

    ``expect_dir_name`` requires the manifest's version to equal the directory name, which is
    how the store addresses bundles; turn it off only for bundles not yet in place (staging).
    """
    root = _check_root(path)
    manifest = _read_manifest(root, max_manifest_bytes)
    if expect_dir_name and manifest.version != root.name:
        raise BundleError(f"bundle {root.name}: manifest version {quote_untrusted(manifest.version)} "
                          "does not match the directory name")
    _check_disk_files(root, manifest)
    real_root = root.resolve()
    for entry in manifest.files:
        _check_listed_file(root, real_root, entry)
    problem = knowledge_problem(root, manifest) or prototypes_problem(root, manifest)
    if problem:
        raise BundleError(f"bundle {root.name}: {problem}")
    return Bundle(root=root, manifest=manifest)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A validated bundle; loaders accept only files listed in the manifest, by their kind."""

    root: Path
    manifest: BundleManifest

    @property
    def version(self) -> str:
        return self.manifest.version

    def path(self, rel: str) -> Path:
        """Filesystem path of a listed file; anything unlisted is refused."""
        if self.manifest.entry(rel) is None:
            raise BundleError(f"{self.manifest.version}/{rel}: not listed in the bundle")
        return self.root / rel

    def _file(self, rel: str, suffix: str) -> Path:
        full = self.path(rel)
        if full.suffix != suffix:
            raise BundleError(f"{self.manifest.version}/{rel}: is not a {suffix} file")
        return full

    def _label(self, rel: str) -> str:
        return f"{self.manifest.version}/{rel}"

    def load_json(self, rel: str) -> Any:
        """Parsed JSON content of a listed ``.json`` file."""
        full = self._file(rel, ".json")
        return parse_json_strict(full.read_bytes(), self._label(rel))

    def load_npy(self, rel: str, *, mmap: bool = False) -> np.ndarray:
        """A listed ``.npy`` array; never unpickles. ``mmap`` maps it read-only instead of reading it."""
        full = self._file(rel, ".npy")
        try:
            return np.load(full, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (ValueError, OSError, EOFError) as exc:
            raise BundleError(f"{self._label(rel)}: cannot load array ({exc})") from None

    def load_safetensors(self, rel: str, *, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors of a listed ``.safetensors`` file, by name."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        full = self._file(rel, ".safetensors")
        try:
            return load_file(full, device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"{self._label(rel)}: cannot load tensors ({exc})") from None

    def load_parquet(self, rel: str, *, columns: list[str] | None = None) -> pa.Table:
        """A listed ``.parquet`` file as an Arrow table (optionally only some columns)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        full = self._file(rel, ".parquet")
        try:
            return pq.read_table(full, columns=columns)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise BundleError(f"{self._label(rel)}: cannot read parquet ({exc})") from None

    def load_parquet_pandas(self, rel: str, *, columns: list[str] | None = None) -> pd.DataFrame:
        """A listed ``.parquet`` file as a pandas DataFrame."""
        return self.load_parquet(rel, columns=columns).to_pandas()
