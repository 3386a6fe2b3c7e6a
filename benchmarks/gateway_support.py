"""A gateway process for benchmarks: started on a loopback port with settings from the
environment, waited for until ready, its peak memory read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def start_gateway(port: int, log: str | Path, settings: dict[str, str], ready_timeout_s: float = 300.0
                  ) -> subprocess.Popen:
    """``python -m service.api`` with ``RECLORA_<KEY>=value`` for every item of ``settings``."""
    env = dict(os.environ, RECLORA_PORT=str(port), RECLORA_HOST="127.0.0.1", RECLORA_LOG_JSON="false",
               **{f"RECLORA_{key.upper()}": str(value) for key, value in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "service.api"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.time() + ready_timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"gateway did not become ready; see {log}")


def stop_gateway(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0
