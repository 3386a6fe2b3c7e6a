"""The deployment files agree with each other and with the service: compose, Prometheus, Dockerfile, demo."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEMO = ROOT / "scripts" / "demo"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def gateway(compose) -> dict:
    return compose["services"]["gateway"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    """Compose durations such as '90s', '3m', '1m30s'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


# ---- docker-compose.yml -----------------------------------------------------------------------

def test_compose_has_the_three_services(compose):
    assert {"redis", "gateway", "prometheus"} <= set(compose["services"])


def test_redis_persists_with_aof_on_a_named_volume(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_gateway_environment_names_real_settings(gateway):
    env = env_of(gateway)
    fields = Settings.env_names()
    unknown = {k for k in env if k.startswith("RECLORA_")} - fields
    assert not unknown, f"not settings of service/config.py: {sorted(unknown)}"
    assert env["RECLORA_REDIS_URL"] == "redis://redis:6379/0"
    assert env["RECLORA_HOST"] == "0.0.0.0"


def test_gateway_waits_for_redis_and_mounts_weights_read_only(gateway):
    assert gateway["build"] in (".", {"context": "."})
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    env = env_of(gateway)
    mounts = {}
    for volume in gateway["volumes"]:
        source, target, mode = volume.split(":")
        mounts[source] = (target, mode)
    assert mounts["./model_store"] == (env["RECLORA_MODEL_STORE"], "ro")
    target, mode = mounts["./models"]
    assert mode == "ro" and Path(env["RECLORA_BASE_MODEL_DIR"]).parent == Path(target)


def test_gateway_port_and_readiness_check(gateway):
    port = env_of(gateway).get("RECLORA_PORT", "8000")
    assert any(str(p).endswith(f":{port}") for p in gateway["ports"])
    check = gateway["healthcheck"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(check["test"])
    assert seconds(check["start_period"]) >= 60  # the base LLM loads slowly on CPU


def test_compose_reserves_a_place_for_the_vllm_profile():
    assert re.search(r"^\s*#.*vllm.*profile", COMPOSE.read_text(), re.I | re.M)


# ---- deploy/prometheus.yml --------------------------------------------------------------------

def test_prometheus_scrapes_the_gateway_metrics(compose, gateway):
    prometheus = compose["services"]["prometheus"]
    assert any(v.startswith("./deploy/prometheus.yml:") for v in prometheus["volumes"])
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "reclora-gateway"]
    port = env_of(gateway).get("RECLORA_PORT", "8000")
    assert job["static_configs"][0]["targets"] == [f"gateway:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert seconds(job["scrape_interval"]) == 5
    assert seconds(job["scrape_timeout"]) <= seconds(job["scrape_interval"])

    from service.api.metrics.router import router
    assert "/metrics" in {route.path for route in router.routes}


# ---- Dockerfile and .dockerignore -------------------------------------------------------------

def test_dockerfile_runs_the_gateway_as_non_root():
    instructions = dockerfile_instructions()
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (cmd,) = [args for kw, args in instructions if kw == "CMD"]
    assert json.loads(cmd) == ["python", "-m", "service.api"]
    (check,) = [args for kw, args in instructions if kw == "HEALTHCHECK"]
    assert "/livez" in check and "curl" not in check
    assert ("EXPOSE", "8000") in instructions
    env = " ".join(args for kw, args in instructions if kw == "ENV")
    assert "RECLORA_HOST=0.0.0.0" in env
    (volume,) = [args for kw, args in instructions if kw == "VOLUME"]
    assert set(json.loads(volume)) == {"/app/model_store", "/app/models"}


def test_dockerfile_installs_cpu_torch_then_the_project():
    text = DOCKERFILE.read_text()
    assert "python:3.11-slim" in text
    assert "https://download.pytorch.org/whl/cpu" in text and "TORCH_VERSION=2.13.0" in text
    assert text.index("torch==") < text.index("pip install --no-deps .")


def test_dockerignore_keeps_weights_and_environments_out():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "work/", "models/", "model_store/*"} <= patterns


# ---- scripts/demo -----------------------------------------------------------------------------

bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@bash
def test_demo_script_parses_and_helps():
    assert os.access(DEMO, os.X_OK)
    subprocess.run(["bash", "-n", str(DEMO)], check=True)
    done = subprocess.run([str(DEMO), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for flag in ("--data-dir", "--budget", "--prompt-form", "--port", "--no-serve"):
        assert flag in done.stdout


@bash
@pytest.mark.parametrize("args", [["--bogus"], ["--budget", "huge"], ["--prompt-form", "long"], ["--port", "http"],
                                  ["--port", "0"]])
def test_demo_script_refuses_bad_flags_before_doing_anything(args):
    done = subprocess.run([str(DEMO), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "scripts/demo:" in done.stderr


def test_demo_request_item_ranges():
    spec = importlib.util.spec_from_file_location("demo_request", ROOT / "scripts" / "demo_request.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_items("1-5") == [1, 2, 3, 4, 5]
    assert module.parse_items("50,172, 181") == [50, 172, 181]
    assert module.parse_items("1-3,10") == [1, 2, 3, 10]
