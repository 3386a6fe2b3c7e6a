"""The embedded engine's native CPU kernels (``kernels.cpp``: ragged attention, rotary from a
bfloat16 projection, the MLP's fused SiLU-and-product), built on first use.

It is compiled for the machine it runs on (``-march=native``) into a cache directory keyed by the
source, the compiler flags and the CPU's features, so a build is never reused on a different CPU.
Where no C++ compiler is found, or the build or a call fails, ``load`` returns None and the engine
uses torch's kernels instead: the kernels are a speed-up, never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ROW_FIELDS = 5  # query start, query count, first query's position, key start, context index

_lock = threading.Lock()
_loaded: dict[str, "NativeKernels | None"] = {}


class NativeKernels:
    """ctypes bindings of ``kernels.cpp``: CPU tensors in, results out."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._attention = library.ragged_attention
        self._attention.argtypes = [p, p, p, p, i64, p, i64, p, i64, i64, i64, ctypes.c_float, i64]
        self._attention.restype = ctypes.c_int
        self._silu_mul = library.silu_mul_bf16
        self._silu_mul.argtypes = [p, p, p, i64, i64]
        self._silu_mul.restype = ctypes.c_int
        self._rotary = library.rotary_bf16
        self._rotary.argtypes = [p, p, p, p, i64, i64, i64, i64]
        self._rotary.restype = ctypes.c_int
        self._rms_norm = library.rms_norm_bf16
        self._rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float, i64]
        self._rms_norm.restype = ctypes.c_int

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                  contexts: torch.Tensor, scale: float) -> torch.Tensor:
        """``q`` (queries, heads, dim), ``k``/``v`` (tokens, kv_heads, dim), ``rows`` (rows, 5) and
        ``contexts`` (contexts, 3) int64 as the kernel documents them. The caller keeps the
        context tensors whose addresses ``contexts`` holds alive for the call."""
        _check((q, k, v), torch.float32, "the native attention")
        out = torch.empty_like(q)
        code = self._attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), len(rows), rows.data_ptr(),
                               len(contexts), contexts.data_ptr() if len(contexts) else None, q.shape[1], k.shape[1],
                               q.shape[2], scale, torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"native attention failed with code {code}")
        return out

    def silu_mul_(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``gate`` overwritten with ``silu(gate) * up``, computed in float32 and rounded once to
        bfloat16; both bfloat16 of one shape."""
        _check((gate, up), torch.bfloat16, "the native SiLU product")
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
        code = self._silu_mul(gate.data_ptr(), up.data_ptr(), gate.data_ptr(), gate.numel(), torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"native SiLU product failed with code {code}")
        return gate

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` (tokens, heads, dim) bfloat16 as float32 with the rotary embedding of ``cos`` and
        ``sin`` (tokens, dim) float32 applied, as transformers' ``apply_rotary_pos_emb``."""
        _check((x,), torch.bfloat16, "the native rotary")
        _check((cos, sin), torch.float32, "the native rotary")
        tokens, heads, dim = x.shape
        if cos.shape != (tokens, dim) or sin.shape != (tokens, dim) or dim % 2:
            raise ValueError(f"rotary of {tuple(x.shape)} needs even dim and cos/sin of {(tokens, dim)}, "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
        out = torch.empty(x.shape, dtype=torch.float32)
        code = self._rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), tokens, heads, dim,
                            torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"native rotary failed with code {code}")
        return out


    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The RMSNorm of ``x`` (tokens, width) float32 with ``weight`` (width) float32, as bfloat16,
        rounded once (``F.rms_norm`` in float32, then a cast); width a multiple of 16."""
        _check((x, weight), torch.float32, "the native RMSNorm")
        if x.dim() != 2 or weight.shape != (x.shape[1],) or x.shape[1] % 16:
            raise ValueError(f"RMSNorm of {tuple(x.shape)} needs a width that is a multiple of 16 and a weight of "
                             f"it, got {tuple(weight.shape)}")
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        code = self._rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                              torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"native RMSNorm failed with code {code}")
        return out


def _check(tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, what: str) -> None:
    for t in tensors:
        if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{what} takes contiguous {str(dtype).removeprefix('torch.')} CPU tensors")


def load(cache_dir: Path | None = None) -> NativeKernels | None:
    """The kernels, built into ``cache_dir`` when not built yet; None where they cannot be built.

    A library is only loaded from a directory that this user owns and nobody else may write to
    (nor may anyone else write the file): loading a planted library would run its code here. A
    cache that fails the check is left alone, and the kernels are built for this process in a
    private temporary directory instead."""
    target = (Path(cache_dir) if cache_dir else _default_cache()) / f"kernels-{_build_key()}.so"
    with _lock:
        if str(target) not in _loaded:
            _loaded[str(target)] = _build_and_load(target)
        return _loaded[str(target)]


def _build_and_load(target: Path) -> NativeKernels | None:
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(target.parent) or (target.exists() and not _private(target)):
            log.warning("%s may be written by other users: the native kernels are built in a private "
                        "directory for this process instead", target.parent)
            target = Path(tempfile.mkdtemp(prefix="reclora-native-")) / target.name
        if not target.exists():
            compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
            if compiler is None:
                log.warning("no C++ compiler found: the engine uses torch's kernels")
                return None
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: atomic
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True,
                               capture_output=True, text=True, timeout=300)
                os.replace(built, target)
        return NativeKernels(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("native kernels unavailable, the engine uses torch's kernels: %s", detail)
        return None


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else (symlinks not followed)."""
    st = path.lstat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def _build_key() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(platform.machine().encode())
    digest.update(_cpu_features().encode())
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), so a cached build made for another CPU is not reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reclora-serving" / "native"
