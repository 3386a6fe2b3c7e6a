from __future__ import annotations

import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import pytest
from tests.http_support import closed_port

from training.data.download import DownloadError, download_movielens, extract_zip_safely


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def serve(monkeypatch):
    """Serve fixed bytes over HTTP on localhost; yields a function returning the URL."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    servers = []

    def start(body: bytes, status: int = 200) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/ml-100k.zip"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_unreachable_host_gives_clear_error(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/ml-100k.zip"
    with pytest.raises(DownloadError) as info:
        download_movielens("ml-100k", tmp_path, timeout=2.0, url=url)
    message = str(info.value)
    assert "could not reach 127.0.0.1" in message
    assert "--data-dir" in message and "local directory" in message
    assert not (tmp_path / "ml-100k").exists()
    assert list(tmp_path.iterdir()) == []  # the partial download is cleaned up


def test_silent_host_times_out_with_clear_error(tmp_path):
    with socket.socket() as listener:  # accepts connections but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/ml-100k.zip"
        with pytest.raises(DownloadError, match=r"could not reach 127\.0\.0\.1.*Timeout"):
            download_movielens("ml-100k", tmp_path, timeout=0.3, url=url)


def test_downloads_extracts_and_then_skips(tmp_path, serve):
    url = serve(make_zip({"ml-100k/u.data": b"1\t1\t5\t0\n", "ml-100k/README": b"hi"}))
    target = download_movielens("ml-100k", tmp_path / "data", url=url, timeout=5.0)
    assert target == tmp_path / "data" / "ml-100k"
    assert (target / "u.data").read_bytes() == b"1\t1\t5\t0\n"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ml-100k"]
    # Already present: no request is made (this URL would fail).
    dead = f"http://127.0.0.1:{closed_port()}/ml-100k.zip"
    assert download_movielens("ml-100k", tmp_path / "data", url=dead, timeout=2.0) == target


def test_http_error_status(tmp_path, serve):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_movielens("ml-100k", tmp_path, url=serve(b"missing", status=404), timeout=5.0)


def test_archive_without_expected_folder(tmp_path, serve):
    url = serve(make_zip({"other/u.data": b""}))
    with pytest.raises(DownloadError, match="does not contain ml-100k/u.data"):
        download_movielens("ml-100k", tmp_path, url=url, timeout=5.0)


def test_not_a_zip(tmp_path, serve):
    with pytest.raises(DownloadError, match="not a valid zip"):
        download_movielens("ml-100k", tmp_path, url=serve(b"<html>oops</html>"), timeout=5.0)


@pytest.mark.parametrize("member", ["../evil.txt", "ml-100k/../../evil.txt", "/tmp/evil.txt",
                                    "C:/evil.txt", "..\\evil.txt"])
def test_extract_rejects_escaping_members(tmp_path, member):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip({"ml-100k/u.data": b"ok", member: b"pwned"}))
    dest = tmp_path / "out" / "deeper"
    with pytest.raises(DownloadError, match="unsafe archive member"):
        extract_zip_safely(archive, dest)
    assert not dest.exists()  # nothing at all was extracted
    assert not list(tmp_path.rglob("evil.txt"))


def test_extract_rejects_symlinks(tmp_path):
    info = zipfile.ZipInfo("ml-100k/link")
    info.external_attr = (0o120777 << 16)
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    archive = tmp_path / "link.zip"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(DownloadError, match="symbolic link"):
        extract_zip_safely(archive, tmp_path / "out")


def test_extract_safe_archive(tmp_path):
    archive = tmp_path / "ok.zip"
    archive.write_bytes(make_zip({"ml-1m/ratings.dat": b"1::1::5::0\n", "ml-1m/a/b.txt": b"x"}))
    extract_zip_safely(archive, tmp_path / "out")
    assert (tmp_path / "out" / "ml-1m" / "ratings.dat").read_bytes() == b"1::1::5::0\n"


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="ml-100k, ml-1m, ml-latest-small"):
        download_movielens("ml-25m", tmp_path)  # type: ignore[arg-type]
