"""Run ``training.cli`` as torchrun's entry, with every rank but 0 forbidden to write under
RANK_GUARD_DIR: a write there (a file opened for writing, a directory made or removed, a rename,
a safetensors save) raises, so the job fails. ``torchrun_cli`` launches it for the tests."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path, guarded: Path) -> bool:
    try:
        return isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).resolve().is_relative_to(guarded)
    except (OSError, ValueError, TypeError):
        return False


def guard(guarded: Path) -> None:
    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            if writes and _inside(path, guarded):
                raise PermissionError(f"rank {os.environ['RANK']} wrote {path}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.replace"):
            if _inside(args[0], guarded):
                raise PermissionError(f"rank {os.environ['RANK']} {event} {args[0]}")

    sys.addaudithook(hook)

    import safetensors.torch  # the Rust writer is not audited: refuse its saves under the guarded path

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if _inside(filename, guarded):
            raise PermissionError(f"rank {os.environ['RANK']} saved {filename}")
        return real(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file


def torchrun_cli(guarded: Path, *args: str, processes: int = 2, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """``reclora ARGS`` under ``torchrun --nproc-per-node PROCESSES --standalone``, each process
    single-threaded, every rank but 0 forbidden to write under ``guarded``; a failed job fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RANK_GUARD_DIR": str(guarded), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                           "--standalone", "-m", "tests.training.rank_guard", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


if __name__ == "__main__":
    if os.environ.get("RANK", "0") != "0":
        guard(Path(os.environ["RANK_GUARD_DIR"]).resolve())
    sys.argv = ["reclora", *sys.argv[1:]]
    runpy.run_module("training.cli", run_name="__main__")
