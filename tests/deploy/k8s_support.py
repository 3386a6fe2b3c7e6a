"""Rendering the Kubernetes overlays (deploy/k8s) and reading what they hold, for the tests of
tests/deploy: objects by kind and name, pod specs, mounts and claims, and a gateway container's
environment and settings as the kubelet and the process would build them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
README = K8S / "README.md"
KUBECTL = shutil.which("kubectl")
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SETTINGS_ENV = Settings.env_names()
SAMPLE_DIGEST = "0" * 63 + "1"
GATEWAY = "reclora-gateway"
HISTORY_STORE = {"app.kubernetes.io/component": "history-store"}  # label of the Redis StatefulSet's pods


JOBS = sorted(p.name for p in (K8S / "jobs").iterdir()
              if (p / "kustomization.yaml").is_file() and p.name != "volumes")


@cache
def render_dir(directory: Path) -> tuple[dict, ...]:
    """The objects ``kubectl kustomize`` renders from a kustomization directory."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the overlays")
    done = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(overlay: str) -> tuple[dict, ...]:
    return render_dir(K8S / "overlays" / overlay)


def objects(overlay: str, kind: str) -> list[dict]:
    return [o for o in render(overlay) if o["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> dict:
    (obj,) = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    return obj


def workloads(overlay: str) -> list[dict]:
    return [o for o in render(overlay) if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def gateways(overlay: str) -> list[dict]:
    return [d for d in objects(overlay, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == GATEWAY]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def gateway_container(deployment: dict) -> dict:
    (container,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == "gateway"]
    return container


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def volume_of(workload: dict, mount: dict) -> dict:
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
    return volume


def mount_at(workload: dict, container: dict, path: str) -> dict:
    """The volume mount that holds ``path`` (the longest mount path above it)."""
    candidates = [m for m in container.get("volumeMounts", [])
                  if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert candidates, f"{path} is on no volume of {workload['metadata']['name']}/{container['name']}"
    return max(candidates, key=lambda m: len(m["mountPath"]))


def claim_of(workload: dict, container: dict, path: str) -> str | None:
    volume = volume_of(workload, mount_at(workload, container, path))
    return volume.get("persistentVolumeClaim", {}).get("claimName")


def resolved_env(overlay: str, workload: dict, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps first, then `env` in
    order with $(VAR) expanded from what came before; the pod name and the admin token digest
    stand in for the downward API and the Secret."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom source {source}"
        env.update(named(overlay, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                           lambda m: env[m.group(1)] if m.group(1) in env else pytest.fail(
                               f"$({m.group(1)}) used before it is defined in {workload['metadata']['name']}"),
                           item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            value = f"{workload['metadata']['name']}-5d9c7b6f4-x2x7q"
        elif "secretKeyRef" in item.get("valueFrom", {}):
            assert item["name"] == "RECLORA_ADMIN_TOKEN_SHA256", item
            value = json.dumps([SAMPLE_DIGEST])
        else:
            pytest.fail(f"unexpected env source {item}")
        env[item["name"]] = value
    return env


def settings_of(overlay: str, deployment: dict, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as the gateway process would read them from its environment."""
    for key in list(os.environ):
        if key.startswith("RECLORA_"):
            monkeypatch.delenv(key)
    for key, value in resolved_env(overlay, deployment, gateway_container(deployment)).items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def flags(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        out[name] = value if sep else None
    return out


def uses_component(overlay: str, component: str) -> bool:
    """Whether the overlay's kustomization lists ``components/<component>``."""
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    return any(Path(c).parts[-2:] == ("components", component) for c in kustomization.get("components", []))


REDIS_CLUSTER_OVERLAYS = [o for o in OVERLAYS if uses_component(o, "redis-cluster")]


def history_store(overlay: str) -> dict:
    """The one StatefulSet of the overlay that runs the history store (Redis)."""
    (store,) = [s for s in objects(overlay, "StatefulSet")
                if selects(HISTORY_STORE, s["spec"]["template"]["metadata"]["labels"])]
    return store
