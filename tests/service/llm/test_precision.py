"""Which dtype ``auto`` picks: bfloat16 only where it is computed natively."""

from __future__ import annotations

import torch

from service.llm import precision
from service.llm.precision import _cpu_flags, resolve_dtype


def test_explicit_settings_win():
    assert resolve_dtype("float32", "cuda:0") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


def test_gpus_get_bfloat16():
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16


def test_cpu_follows_its_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\nbugs\t\t: none\n")
    assert "avx512_bf16" in _cpu_flags(info) and precision.BF16_CPU_FLAGS & _cpu_flags(info)
    assert _cpu_flags(tmp_path / "missing") == set()
