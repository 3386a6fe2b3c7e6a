"""Which floating-point type to run the LLM in on this hardware."""

from __future__ import annotations

import torch


def resolve_dtype(setting: str, device: str | torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs and on CPUs that compute it natively (AVX512-BF16, AMX), else
    float32, because emulated bfloat16 matmuls on a plain AVX2 CPU run ~50x slower than float32."""
    if setting != "auto":
        return getattr(torch, setting)
    if str(device).startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") else torch.float32
