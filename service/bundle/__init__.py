"""Versioned model bundles: the manifest schema and a reader that refuses anything untrusted."""

from service.bundle.manifest import (
    ALLOWED_SUFFIXES,
    MANIFEST_NAME,
    BundleManifest,
    ComponentInfo,
    FileEntry,
    validate_relpath,
    validate_version,
)
from service.bundle.reader import (
    MAX_MANIFEST_BYTES,
    Bundle,
    BundleError,
    file_sha256,
    load_bundle,
    verify_npy_header,
    verify_parquet_magic,
    verify_safetensors_header,
)

__all__ = [
    "ALLOWED_SUFFIXES",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "Bundle",
    "BundleError",
    "BundleManifest",
    "ComponentInfo",
    "FileEntry",
    "file_sha256",
    "load_bundle",
    "validate_relpath",
    "validate_version",
    "verify_npy_header",
    "verify_parquet_magic",
    "verify_safetensors_header",
]
