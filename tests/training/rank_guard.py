"""Run ``training.cli`` as torchrun's entry, with every rank but 0 forbidden to write under
RANK_GUARD_DIR: a write there (a file opened for writing, a directory made or removed, a rename,
a safetensors save) raises, so the job fails. ``python -m torch.distributed.run ... -m
tests.training.rank_guard train-llm ...``."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

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


if __name__ == "__main__":
    if os.environ.get("RANK", "0") != "0":
        guard(Path(os.environ["RANK_GUARD_DIR"]).resolve())
    sys.argv = ["reclora", *sys.argv[1:]]
    runpy.run_module("training.cli", run_name="__main__")
