"""The Redis Cluster variant of the history store (deploy/k8s/components/redis-cluster): six nodes
in cluster mode with AOF on every node, announced by name, formed by an idempotent Job, one node
down at a time, reachable by the gateways and each other only, and gateways configured for it.
The shell the pods run is run here too, against stand-ins for redis-cli, getent and redis-server
on PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from tests.deploy.k8s_support import (GATEWAY, K8S, README, REDIS_CLUSTER_OVERLAYS, containers, gateways,
                                      history_store, mount_at, named, objects, pod_spec, render, selects, settings_of,
                                      workloads)

JOB = "reclora-redis-cluster-create"
SHELL = shutil.which("dash") or shutil.which("sh")  # the redis image's /bin/sh is dash
BASE_REDIS = list(yaml.safe_load_all((K8S / "base" / "redis.yaml").read_text()))
each_overlay = pytest.mark.parametrize("overlay", REDIS_CLUSTER_OVERLAYS)


def test_an_overlay_uses_the_cluster():
    assert REDIS_CLUSTER_OVERLAYS == ["cpu-gateway-redis-cluster"]


def node_args(statefulset: dict) -> dict[str, str]:
    """redis-server's options, ``--name value`` pairs after the program."""
    (container,) = containers(statefulset)
    args = container["args"]
    assert args[0] == "redis-server" and len(args) % 2 == 1
    assert all(a.startswith("--") for a in args[1::2])
    return dict(zip(args[1::2], args[2::2], strict=True))


def size(value: str) -> int:
    """Bytes of a Kubernetes quantity (2Gi) or a Redis memory size (1gb)."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", value).groups()
    units = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    return int(number) * units[unit]


def node_hosts(overlay: str) -> list[str]:
    """Every node by the name it announces: its pod's name under the headless Service."""
    redis = history_store(overlay)
    service = named(overlay, "Service", redis["spec"]["serviceName"])["metadata"]["name"]
    return [f"{redis['metadata']['name']}-{i}.{service}" for i in range(redis["spec"]["replicas"])]


def script(container: dict) -> str:
    assert container["command"][:2] == ["sh", "-c"]
    return container["command"][2]


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


# ---- one Redis workload: the cluster ---------------------------------------------------------

@each_overlay
def test_the_only_redis_is_the_six_node_cluster(overlay):
    redis = [w for w in workloads(overlay) if w["kind"] != "Job"
             and any(c["image"].startswith("redis:") for c in containers(w))]
    assert [(w["kind"], w["metadata"]["name"]) for w in redis] == [("StatefulSet", "reclora-redis-cluster")]
    assert history_store(overlay) is redis[0]
    assert redis[0]["spec"]["replicas"] == 6
    # Every pod at once: none is ready before the Job has formed the cluster out of all six.
    assert redis[0]["spec"]["podManagementPolicy"] == "Parallel"
    assert not [o for o in render(overlay) if o["metadata"]["name"] == "reclora-redis"]  # base/redis.yaml is out
    # The same pinned image as the single node's, for the nodes and for the Job's redis-cli.
    (base_image,) = [c["image"] for doc in BASE_REDIS if doc["kind"] == "StatefulSet"
                     for c in doc["spec"]["template"]["spec"]["containers"]]
    job = named(overlay, "Job", JOB)
    assert {c["image"] for w in (redis[0], job) for c in containers(w)} == {base_image}
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?", base_image)


@each_overlay
def test_nodes_run_in_cluster_mode_with_aof_on_their_claims(overlay):
    redis = history_store(overlay)
    (container,) = containers(redis)
    args = node_args(redis)
    assert args["--cluster-enabled"] == "yes"
    # AOF on every node, replicas included: WAITAOF 1 1 waits for a replica's AOF too.
    assert args["--appendonly"] == "yes" and args["--appendfsync"] == "everysec"
    assert 1000 <= int(args["--cluster-node-timeout"]) <= 15000  # failover within seconds
    assert args["--cluster-require-full-coverage"] == "no"  # a failed master's slots only
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    for path in (args["--dir"], args["--cluster-config-file"]):
        assert mount_at(redis, container, path)["name"] in claims, path
    assert args["--maxmemory-policy"] == "noeviction"
    assert size(args["--maxmemory"]) < size(container["resources"]["limits"]["memory"])

    # Announced by pod name through the headless Service, which resolves not-ready pods too.
    service = named(overlay, "Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert args["--cluster-preferred-endpoint-type"] == "hostname"
    assert args["--cluster-announce-hostname"] == f"$(POD_NAME).{service['metadata']['name']}"
    (pod_name,) = [e for e in container["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    port = int(args["--port"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"redis": port, "bus": port + 10000}
    assert {p["port"] for p in service["spec"]["ports"]} == {port, port + 10000}


@each_overlay
def test_nodes_report_ready_only_in_a_healthy_cluster(overlay):
    (container,) = containers(history_store(overlay))
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    for check in ("ping", "cluster_state:ok", "role:master", "master_link_status:up"):
        assert check in probe
    assert container["livenessProbe"]["tcpSocket"]  # never restarts a node for the cluster's state
    assert container["startupProbe"]["tcpSocket"]


@each_overlay
def test_nodes_spread_and_go_down_one_at_a_time(overlay):
    redis = history_store(overlay)
    labels = redis["spec"]["template"]["metadata"]["labels"]
    (term,) = pod_spec(redis)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], labels)

    (pdb,) = [p for p in objects(overlay, "PodDisruptionBudget")
              if selects(p["spec"]["selector"]["matchLabels"], labels)]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"].get("unhealthyPodEvictionPolicy", "IfHealthyBudget") == "IfHealthyBudget"
    job_labels = named(overlay, "Job", JOB)["spec"]["template"]["metadata"]["labels"]
    service = named(overlay, "Service", redis["spec"]["serviceName"])
    for selector in (pdb["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        assert not selects(selector, job_labels)


@each_overlay
def test_network_policies_admit_the_gateways_the_job_and_the_nodes_only(overlay):
    redis = history_store(overlay)
    labels = redis["spec"]["template"]["metadata"]["labels"]
    port = int(node_args(redis)["--port"])
    admitted: dict[str, set[int]] = {}
    for policy in objects(overlay, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"]["matchLabels"], labels):
            continue
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, peer  # no namespaces or address blocks
                (name,) = peer["podSelector"]["matchLabels"].values()
                admitted.setdefault(name, set()).update(ports)
    assert admitted == {GATEWAY: {port}, JOB: {port}, "reclora-redis-cluster": {port, port + 10000}}
    for gateway in gateways(overlay):
        assert gateway["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == GATEWAY
    assert named(overlay, "Job", JOB)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == JOB


# ---- the gateways ----------------------------------------------------------------------------

@each_overlay
def test_gateways_select_cluster_mode_with_a_seed_on_the_headless_service(overlay, monkeypatch):
    redis = history_store(overlay)
    service = named(overlay, "Service", redis["spec"]["serviceName"])
    for deployment in gateways(overlay):
        settings = settings_of(overlay, deployment, monkeypatch)
        assert settings.history.redis_cluster is True
        url = urlsplit(settings.history.redis_url)
        assert url.scheme == "redis" and url.hostname == service["metadata"]["name"]
        assert url.port == int(node_args(redis)["--port"])
        assert url.path in ("", "/0")  # a cluster has database 0 only
        assert settings.online.served_log_shards == 16


# ---- the create Job --------------------------------------------------------------------------

def run_job(overlay: str, tmp_path: Path, nodes: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the Job's script; ``nodes`` maps host to what its ``cluster info`` answers ('' for a node
    that does not answer yet, 'down' for one that never does). Returns the run and the redis-cli
    --cluster calls."""
    job = named(overlay, "Job", JOB)
    (container,) = containers(job)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "nodes"
    state.mkdir()
    for host, info in nodes.items():
        (state / host).write_text(info)
    calls = tmp_path / "calls"
    stub(bin_dir, "redis-cli", f'''
if [ "$1" = --cluster ]; then echo "$*" >> {calls}; exit 0; fi
host=$2
info=$(cat "{state}/$host")
case "$info" in
  down) exit 1 ;;
  "") echo up > "{state}/$host"; exit 1 ;;  # answers from the next try on
  up) printf 'cluster_state:fail\\r\\ncluster_slots_assigned:0\\r\\ncluster_known_nodes:1\\r\\n' ;;
  *) printf '%s' "$info" ;;
esac
''')
    stub(bin_dir, "sleep", "exit 0\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"} | {e["name"]: e["value"] for e in container["env"]}
    done = subprocess.run([SHELL, "-c", script(container)], env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    return done, calls.read_text().splitlines() if calls.exists() else []


def formed(slots: int, known: int) -> str:
    return f"cluster_state:ok\r\ncluster_slots_assigned:{slots}\r\ncluster_known_nodes:{known}\r\n"


@each_overlay
def test_job_creates_three_masters_with_one_replica_each_once_all_nodes_answer(overlay, tmp_path):
    hosts, port = node_hosts(overlay), node_args(history_store(overlay))["--port"]
    # Every node empty; two answer only on the second try.
    done, calls = run_job(overlay, tmp_path, {h: "" if i in (2, 5) else "up" for i, h in enumerate(hosts)})
    assert done.returncode == 0, done.stderr
    (call,) = calls
    words = call.split()
    assert words[:2] == ["--cluster", "create"]
    assert words[2:8] == [f"{h}:{port}" for h in hosts]
    options = dict(zip(words[8::2], words[9::2] + [""], strict=True))
    assert options == {"--cluster-replicas": "1", "--cluster-yes": ""}
    masters = len(hosts) // (1 + int(options["--cluster-replicas"]))
    assert masters == 3


@each_overlay
def test_job_only_checks_a_cluster_that_exists(overlay, tmp_path):
    hosts, port = node_hosts(overlay), node_args(history_store(overlay))["--port"]
    # A node that knows other nodes or serves slots belongs to a cluster (a whole one, or one whose
    # creation stopped half-way): nothing is created, even while other nodes are down.
    for i, info in enumerate((formed(16384, 6), formed(0, 6), formed(5461, 1))):
        (tmp_path / str(i)).mkdir()
        done, calls = run_job(overlay, tmp_path / str(i), {hosts[0]: info} | {h: "down" for h in hosts[1:]})
        assert done.returncode == 0, done.stderr
        assert calls == [f"--cluster check {hosts[0]}:{port}"], info


@each_overlay
def test_job_gives_up_on_a_node_that_never_answers(overlay, tmp_path):
    hosts = node_hosts(overlay)
    done, calls = run_job(overlay, tmp_path, {h: "up" for h in hosts[:-1]} | {hosts[-1]: "down"})
    assert done.returncode == 1 and hosts[-1] in done.stderr
    assert calls == []
    job = named(overlay, "Job", JOB)
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0


# ---- a node's start: nodes.conf follows the pods' new addresses -------------------------------

NODES_CONF = """\
07c37dfeb235213a872192d90877d0cd55635b91 10.0.0.5:6379@16379,{h0},tls-port=0,shard-id=aa myself,master - 0 0 1 connected 0-5460
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 10.0.0.6:6379@16379,{h1},tls-port=0,shard-id=bb master - 0 1700000000000 2 connected 5461-10922
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 10.0.0.7:6379@16379,{h2},tls-port=0,shard-id=aa slave 07c37dfeb235213a872192d90877d0cd55635b91 0 1700000000000 1 connected
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 10.0.0.8:6379@16379,,shard-id=cc master - 0 1700000000000 3 connected 10923-16383
vars currentEpoch 3 lastVoteEpoch 0
"""


@each_overlay
def test_node_start_points_nodes_conf_at_the_current_addresses(overlay, tmp_path):
    (container,) = containers(history_store(overlay))
    h0, h1, h2 = node_hosts(overlay)[:3]
    conf = tmp_path / "nodes.conf"
    conf.write_text(NODES_CONF.format(h0=h0, h1=h1, h2=h2))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # h0 and h2 resolve to new addresses, h1 not yet (it keeps its old one); the fourth node
    # announced no name.
    stub(bin_dir, "getent", f'''
case "$2" in
  {h0}) echo "10.9.0.15       {h0}" ;;
  {h2}) echo "10.9.0.17       {h2}" ;;
  *) exit 2 ;;
esac
''')
    stub(bin_dir, "redis-server", f'echo "$@" > {tmp_path}/started\n')
    if shutil.which("mawk"):  # the redis image's awk
        (bin_dir / "awk").symlink_to(shutil.which("mawk"))
    args = [a if a != "/data/nodes.conf" else str(conf) for a in container["args"]]
    assert args != container["args"]

    def start() -> None:
        done = subprocess.run([SHELL, "-c", script(container), *container["command"][3:], *args],
                              env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr

    start()
    assert (tmp_path / "started").read_text().split() == args[1:]  # then Redis, with its options
    expected = (NODES_CONF.format(h0=h0, h1=h1, h2=h2)
                .replace(f"10.0.0.5:6379@16379,{h0}", f"10.9.0.15:6379@16379,{h0}")
                .replace(f"10.0.0.7:6379@16379,{h2}", f"10.9.0.17:6379@16379,{h2}"))
    assert conf.read_text() == expected
    assert not (tmp_path / "nodes.conf.new").exists()

    # A first start: no nodes.conf yet, nothing to rewrite.
    conf.unlink()
    start()
    assert not conf.exists()


# ---- monitoring and README -------------------------------------------------------------------

@each_overlay
def test_redis_alerts_watch_the_cluster_nodes(overlay):
    redis = history_store(overlay)
    (rule,) = objects(overlay, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    replicas = redis["spec"]["replicas"]
    selector = f'kube_statefulset_status_replicas_ready{{statefulset="{redis["metadata"]["name"]}"}}'
    # Critical once two nodes are down (maybe both copies of a shard), a warning for one.
    assert alerts["RecloraRedisDown"]["expr"] == f"{selector} < {replicas - 1}"
    assert alerts["RecloraRedisDown"]["labels"]["severity"] == "critical"
    assert alerts["RecloraRedisClusterNodeDown"]["expr"] == f"{selector} < {replicas}"
    assert alerts["RecloraRedisClusterNodeDown"]["labels"]["severity"] == "warning"


@each_overlay
def test_readme_explains_the_choice_of_history_store(overlay):
    text = README.read_text()
    section = text[text.index("## Choosing the history store"):]
    for needed in ("RECLORA_REDIS_CLUSTER=true", "reclora load-histories", "WAITAOF 1 1", "history_unavailable",
                   "Retry-After", "cluster-node-timeout", f"kubectl apply -k deploy/k8s/overlays/{overlay}"):
        assert needed in section, needed
