"""Schema of ``manifest.json``, the description of a versioned model bundle.

The manifest is the only thing that says which files belong to a bundle, so every field that
ends up in a filesystem path is validated here, before any file is touched.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST_NAME = "manifest.json"
# Formats whose loaders never execute code from the file. Pickle-based formats are excluded.
ALLOWED_SUFFIXES = frozenset({".safetensors", ".npy", ".json", ".parquet"})
# Suffixes of formats that deserialize through pickle; named in errors so the cause is obvious.
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npz"})

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a lowercase hex sha256 digest


def quote_untrusted(value: object, limit: int = 80) -> str:
    """repr() of untrusted text, shortened, so error messages stay readable and escape control characters."""
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def suffix_problem(path: str) -> str | None:
    """Why a file name's suffix is not accepted in a bundle, or None when it is."""
    suffix = PurePosixPath(path).suffix
    if suffix in ALLOWED_SUFFIXES:
        return None
    allowed = ", ".join(sorted(ALLOWED_SUFFIXES))
    if suffix.lower() in PICKLE_SUFFIXES:
        return f"{quote_untrusted(path)}: pickle files are not accepted ({suffix} can run code when loaded); allowed: {allowed}"
    return f"{quote_untrusted(path)}: file type {quote_untrusted(suffix or '(none)')} is not accepted; allowed: {allowed}"


def validate_version(version: str) -> str:
    """A bundle version doubles as a directory name, so it must be a single safe path segment."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or ".." in version:
        raise ValueError(
            f"version {quote_untrusted(version)} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return version


def validate_relpath(path: str) -> str:
    """A bundle file path: relative POSIX, plain segments, an allowed suffix, not the manifest."""
    if not isinstance(path, str) or not path:
        raise ValueError("file path is empty")
    if "\\" in path:
        raise ValueError(f"file path {quote_untrusted(path)} contains a backslash; use '/'")
    if path.startswith("/"):
        raise ValueError(f"file path {quote_untrusted(path)} is absolute; paths are relative to the bundle")
    for segment in path.split("/"):
        if not segment:
            raise ValueError(f"file path {quote_untrusted(path)} has an empty segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise ValueError(f"file path {quote_untrusted(path)} has a {segment!r} segment; use plain names")
        if not _SEGMENT_RE.fullmatch(segment):
            raise ValueError(
                f"file path {quote_untrusted(path)}: segment {quote_untrusted(segment)} must be 1-128 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
    if path == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} describes the bundle and cannot list itself")
    problem = suffix_problem(path)
    if problem:
        raise ValueError(problem)
    return path


class FileEntry(BaseModel):
    """One data file of the bundle, with the size and hash it must have on disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    size: int = Field(ge=0, strict=True)

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        return validate_relpath(value)

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str) -> str:
        if not SHA256_HEX.fullmatch(value):
            raise ValueError(f"sha256 {quote_untrusted(value)} must be 64 lowercase hex characters")
        return value


class ComponentInfo(BaseModel):
    """A named group of files (e.g. ``crm``, ``items``) with a small config for quick inspection."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=64)
    config: dict[str, Any] = Field(default_factory=dict)


class BundleManifest(BaseModel):
    """Everything a reader needs to trust a bundle: its identity, provenance and exact file list."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1]
    version: str
    created_at: datetime
    description: str = ""
    components: dict[str, ComponentInfo] = Field(default_factory=dict)
    files: list[FileEntry]
    metrics: dict[str, Any] = Field(default_factory=dict)
    parents: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _check_schema_version(cls, value: Any) -> Any:
        # Literal[1] alone would also accept True; only the integer 1 is this schema.
        if type(value) is not int:
            raise ValueError(f"schema_version must be the integer 1, got {quote_untrusted(value)}")
        return value

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        return validate_version(value)

    @field_validator("parents")
    @classmethod
    def _check_parents(cls, value: list[str]) -> list[str]:
        return [validate_version(v) for v in value]

    @field_validator("components")
    @classmethod
    def _check_components(cls, value: dict[str, ComponentInfo]) -> dict[str, ComponentInfo]:
        for name in value:
            if not _COMPONENT_RE.fullmatch(name):
                raise ValueError(f"component name {quote_untrusted(name)} must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _check_file_set(self) -> BundleManifest:
        # Case-folded comparison: two entries differing only in case collide on some filesystems.
        seen: dict[str, str] = {}
        for entry in self.files:
            key = entry.path.casefold()
            if key in seen:
                raise ValueError(f"file path {quote_untrusted(entry.path)} is listed more than once "
                                 f"(clashes with {quote_untrusted(seen[key])})")
            seen[key] = entry.path
        # A listed file cannot also be a directory holding other listed files.
        for entry in self.files:
            for parent in PurePosixPath(entry.path.casefold()).parents:
                if str(parent) in seen:
                    raise ValueError(f"file path {quote_untrusted(entry.path)} lies under the listed file "
                                     f"{quote_untrusted(seen[str(parent)])}")
        return self

    def entry(self, path: str) -> FileEntry | None:
        """The listing for ``path``, or None when the bundle does not contain it."""
        return next((e for e in self.files if e.path == path), None)
