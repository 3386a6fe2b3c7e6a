"""Unpacking uploads: only plain files with valid bundle paths, within the caps."""

from __future__ import annotations

import asyncio
import gzip
import io
import tarfile
from pathlib import Path

import pytest

from service.registry.archive import UploadError, pack, receive, unpack


def write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], *, gz: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if isinstance(m, tuple):
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
            else:
                tar.addfile(m)
    path.write_bytes(gzip.compress(buf.getvalue()) if gz else buf.getvalue())
    return path


def special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_plain_and_gzip_and_stripped_root(tmp_path: Path):
    files = [("v1/manifest.json", b"{}"), ("v1/crm/config.json", b"{}")]
    for gz in (False, True):
        dest = tmp_path / f"out-{gz}"
        dest.mkdir()
        names = unpack(write_tar(tmp_path / f"a-{gz}.tar", files, gz=gz), dest, max_bytes=1000)
        assert sorted(names) == ["crm/config.json", "manifest.json"]
        assert (dest / "crm" / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("member, message", [
    (special("x.json", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (special("x.json", tarfile.LNKTYPE, "y.json"), "link"),
    (special("dev.json", tarfile.CHRTYPE), "not a regular file"),
    (special("fifo.json", tarfile.FIFOTYPE), "not a regular file"),
    (("../x.json", b"{}"), "outside"),
    (("/abs.json", b"{}"), "outside"),
    (("model.pkl", b"\x80"), "pickle"),
    (("run.sh", b"#!"), "not accepted"),
])
def test_refused_members(tmp_path: Path, member, message: str):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UploadError, match=message):
        unpack(write_tar(tmp_path / "a.tar", [member]), dest, max_bytes=1000)


def test_manifest_refused_in_parts(tmp_path: Path):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UploadError, match="manifest"):
        unpack(write_tar(tmp_path / "a.tar", [("manifest.json", b"{}")]), dest, max_bytes=1000, allow_manifest=False)


def test_unpacked_size_cap_stops_a_bomb(tmp_path: Path):
    dest = tmp_path / "out"
    dest.mkdir()
    archive = write_tar(tmp_path / "bomb.tar.gz", [("a.json", b"\0" * 100_000)], gz=True)
    assert archive.stat().st_size < 1000
    with pytest.raises(UploadError, match="more than") as info:
        unpack(archive, dest, max_bytes=10_000)
    assert info.value.reason == "too_large"


def test_truncated_and_garbage(tmp_path: Path):
    good = write_tar(tmp_path / "a.tar", [("a.json", b"{}" * 2000)]).read_bytes()
    for name, data in (("cut.tar", good[:1500]), ("junk.tar", b"not a tar at all" * 100)):
        dest = tmp_path / name.replace(".", "_")
        dest.mkdir()
        with pytest.raises(UploadError):
            unpack(_write(tmp_path / name, data), dest, max_bytes=10**6)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_receive_caps_the_stream(tmp_path: Path):
    async def body(n: int):
        for _ in range(n):
            yield b"x" * 100

    assert asyncio.run(receive(body(3), tmp_path / "ok", 300)) == 300
    with pytest.raises(UploadError) as info:
        asyncio.run(receive(body(4), tmp_path / "big", 300))
    assert info.value.reason == "too_large"
    with pytest.raises(UploadError, match="empty"):
        asyncio.run(receive(body(0), tmp_path / "empty", 300))


def test_pack_round_trip(tmp_path: Path):
    src = tmp_path / "v1"
    (src / "crm").mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    (src / "crm" / "w.safetensors").write_bytes(b"abc")
    dest = tmp_path / "out"
    dest.mkdir()
    assert sorted(unpack(pack(src, tmp_path / "v1.tar"), dest, max_bytes=1000)) == ["crm/w.safetensors", "manifest.json"]
