"""Which floating-point type to run the LLM in on this hardware."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo) of native bfloat16 dot products: AVX512-BF16 (Intel Cooper Lake
# and later, AMD Zen 4 and later) and AMX.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_dtype(setting: str, device: str | torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs and on CPUs that compute it natively (AVX512-BF16, AMX), else
    float32, because emulated bfloat16 matmuls on a plain AVX2 CPU run ~50x slower than float32."""
    if setting != "auto":
        return getattr(torch, setting)
    if str(device).startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions. torch's own capability report stops
    at "AVX512" on builds without a dedicated bf16 kernel level even where the CPU has them (and
    oneDNN uses them: measured 3.7x the float32 matmul rate on an AVX512-BF16 EPYC), so the CPU's
    flags are read directly where the OS exposes them."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
        return True
    return bool(BF16_CPU_FLAGS & _cpu_flags())


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()
