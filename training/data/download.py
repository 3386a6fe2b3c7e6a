"""Fetch a MovieLens archive from GroupLens once, and unpack it without trusting its paths.

Training machines are often offline, so every failure is a ``DownloadError`` that says what
went wrong and that a local copy can be passed instead.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from os import PathLike
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

import httpx

DatasetName = Literal["ml-100k", "ml-1m", "ml-latest-small"]
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
# A file that only a complete extraction contains; its presence means "already downloaded".
MARKER_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-latest-small": "ratings.csv"}
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A dataset could not be fetched or unpacked."""


def download_movielens(name: DatasetName, dest_dir: str | PathLike[str], timeout: float = 30.0,
                       *, url: str | None = None) -> Path:
    """Return ``dest_dir/name``, downloading and extracting the archive unless already there.

    ``url`` overrides the GroupLens address (e.g. a mirror).
    """
    if name not in MARKER_FILES:
        choices = ", ".join(MARKER_FILES)
        raise ValueError(f"unknown MovieLens dataset {name!r}; choose from {choices}")
    dest = Path(dest_dir)
    target = dest / name
    if (target / MARKER_FILES[name]).is_file():
        return target
    url = url or GROUPLENS_URL.format(name=name)
    dest.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        _fetch(url, archive, timeout)
        staging = Path(tmp) / "extracted"
        extract_zip_safely(archive, staging)
        unpacked = staging / name
        if not (unpacked / MARKER_FILES[name]).is_file():
            raise DownloadError(
                f"archive from {url} does not contain {name}/{MARKER_FILES[name]}"
            )
        if target.exists():  # an earlier, incomplete extraction
            shutil.rmtree(target)
        unpacked.rename(target)
    return target


def extract_zip_safely(archive: str | PathLike[str], dest_dir: str | PathLike[str]) -> None:
    """Extract ``archive`` into ``dest_dir``, refusing it entirely if any member could land
    outside (absolute path, drive letter, '..') or is a symbolic link."""
    dest = Path(dest_dir)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member(info)
            dest.mkdir(parents=True, exist_ok=True)
            zf.extractall(dest)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive} is not a valid zip archive ({err})") from None


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise DownloadError(f"refusing to extract unsafe archive member {info.filename!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DownloadError(f"refusing to extract symbolic link {info.filename!r}")


def _fetch(url: str, path: Path, timeout: float) -> None:
    host = urlsplit(url).hostname or url
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise DownloadError(f"{url} answered HTTP {response.status_code}")
            with path.open("wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
    except (httpx.ConnectError, httpx.TimeoutException, httpx.NetworkError) as err:
        raise DownloadError(
            f"could not reach {host} to download {url} ({type(err).__name__}: {err}). "
            "Without network access, download the archive elsewhere, unzip it, and pass "
            "the local directory instead (e.g. with --data-dir)."
        ) from None
    except httpx.HTTPError as err:
        raise DownloadError(f"downloading {url} failed: {err}") from None
