"""What every ``reclora`` command shares: wall-time reporting, one-line failures, common options."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

DataDir = Annotated[Path, typer.Option("--data", help="prepared dataset directory (from `reclora prepare`)")]


@contextmanager
def timed(what: str) -> Iterator[None]:
    """Every command reports its wall time: operators size jobs from these figures (under torchrun,
    rank 0 alone)."""
    start = time.perf_counter()
    yield
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"{what}: {time.perf_counter() - start:.1f} s wall time")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
