"""Uploaded bundles and bundle parts: a tar stream (optionally gzip), received and unpacked safely.

Uploads come from outside, so the body is capped while it streams (the cap counts bytes received,
not what a header claims), and unpacking accepts only plain directories and regular files whose
names are valid bundle paths: no links, devices, absolute paths or ``..``, and a cap on the number
of members and on the unpacked size (a gzip bomb stops at the cap). Why tar: it streams, it keeps
the bundle's directory layout, and Python reads it without third-party code.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

from service.bundle import MANIFEST_NAME, validate_relpath
from service.registry.errors import RefusalReason

MAX_MEMBERS = 10_000
_CHUNK = 1 << 20


class UploadError(ValueError):
    """The upload is not an acceptable archive; ``reason`` is a metrics label (``RefusalReason``)."""

    def __init__(self, message: str, reason: RefusalReason = RefusalReason.ARCHIVE) -> None:
        super().__init__(message)
        self.reason = reason


async def receive(stream: AsyncIterator[bytes], dest: Path, max_bytes: int) -> int:
    """Write the request body to ``dest``; UploadError (reason ``too_large``) past ``max_bytes``."""
    size = 0
    with open(dest, "wb") as f:
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise UploadError(f"the upload exceeds the {max_bytes}-byte limit", reason=RefusalReason.TOO_LARGE)
            f.write(chunk)
    if size == 0:
        raise UploadError("the upload is empty: send a tar archive of the bundle directory")
    return size


def unpack(archive: Path, dest: Path, *, max_bytes: int, allow_manifest: bool = True) -> list[str]:
    """Unpack ``archive`` into the empty directory ``dest``; the relative file paths written.

    A single top-level directory holding the manifest (``tar -C store -cf - v2``) is stripped, so
    both that and a tar of the directory's contents are accepted.
    """
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UploadError(f"the upload is not a readable tar archive ({exc})") from None
    with tar:
        try:
            members = _members(tar)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UploadError(f"the archive is truncated or corrupt ({exc})") from None
        strip = _common_root(members)
        written: list[str] = []
        total = 0
        for member in members:
            name = member.name[len(strip):] if strip else member.name
            if not name or member.isdir():
                continue
            if name == MANIFEST_NAME and allow_manifest:
                pass
            else:
                try:
                    validate_relpath(name)
                except ValueError as exc:
                    raise UploadError(f"archive member: {exc}") from None
            total += member.size
            if total > max_bytes:
                raise UploadError(f"the archive unpacks to more than {max_bytes} bytes", reason=RefusalReason.TOO_LARGE)
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                source = tar.extractfile(member)
                if source is None:
                    raise UploadError(f"archive member {name!r} has no data")
                with source, open(target, "xb") as out:
                    copied = 0
                    while chunk := source.read(_CHUNK):
                        copied += len(chunk)
                        out.write(chunk)
            except FileExistsError:
                raise UploadError(f"archive member {name!r} appears twice") from None
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise UploadError(f"the archive is truncated or corrupt at {name!r} ({exc})") from None
            if copied != member.size:
                raise UploadError(f"the archive is truncated: {name!r} has {copied} of {member.size} bytes")
            written.append(name)
    if not written:
        raise UploadError("the archive holds no files")
    return written


def _members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = []
    for member in tar:
        if len(members) >= MAX_MEMBERS:
            raise UploadError(f"the archive has more than {MAX_MEMBERS} members")
        name = member.name
        if member.issym() or member.islnk():
            raise UploadError(f"archive member {name!r} is a link; links are not accepted")
        if not (member.isreg() or member.isdir()):
            raise UploadError(f"archive member {name!r} is not a regular file or directory")
        if name.startswith("/") or "\\" in name or ".." in name.split("/"):
            raise UploadError(f"archive member {name!r} would be written outside the bundle")
        member.name = name.removeprefix("./").rstrip("/")
        members.append(member)
    return members


def _common_root(members: list[tarfile.TarInfo]) -> str:
    """``"dir/"`` when every member lies under one top-level directory holding the manifest (a tar
    of the bundle directory itself), else ``""``."""
    files = [m.name for m in members if not m.isdir() and m.name]
    tops = {n.split("/", 1)[0] for n in files}
    if len(tops) == 1 and all("/" in n for n in files):
        top = tops.pop()
        if f"{top}/{MANIFEST_NAME}" in files:
            return top + "/"
    return ""


def pack(source: Path, dest: Path | None = None) -> Path:
    """A tar of ``source``'s contents (the client side of an upload); regular files only."""
    dest = dest or source.with_suffix(".tar")
    with tarfile.open(dest, "w") as tar:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if full.is_symlink() or not full.is_file():
                    raise UploadError(f"{full} is not a regular file")
                tar.add(full, arcname=full.relative_to(source).as_posix(), recursive=False)
    return dest
