"""The process-group helpers: shares, gathers and gradient sums over two gloo processes, and a
plain run that never joins a group."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training.distributed import Ranks, backend_for, current, process_group, rank_step_seed


def test_shares_are_contiguous_and_cover_everything() -> None:
    for n in (0, 1, 7, 9, 10):
        for world in (1, 2, 3):
            parts = [Ranks(rank, world).share(n) for rank in range(world)]
            assert [i for s in parts for i in range(n)[s]] == list(range(n))
            assert max(len(range(n)[s]) for s in parts) - min(len(range(n)[s]) for s in parts) <= 1


def test_a_plain_run_joins_no_group(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as ranks:
        assert ranks == Ranks() and not ranks.distributed and ranks.is_main
        assert current() == Ranks()
        assert not torch.distributed.is_initialized()
        ranks.barrier()  # no group: nothing to wait for
        assert ranks.sum([1.5, 2]) == [1.5, 2.0] and ranks.any(False) is False
        np.testing.assert_array_equal(ranks.gather(np.arange(3.0)), np.arange(3.0))


def test_the_backend_follows_the_device() -> None:
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl" and backend_for("cuda:1") == "nccl"
    assert backend_for("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


def test_step_seeds_differ_by_rank_and_step() -> None:
    seeds = {rank_step_seed(0, step, rank) for step in range(4) for rank in range(2)}
    assert len(seeds) == 8 and rank_step_seed(0, 3, 1) == rank_step_seed(0, 3, 1)


def _rank_body(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group("cpu") as ranks:
        assert ranks.distributed and ranks.rank == rank and ranks.world == 2
        local = np.arange(rank * 10, rank * 10 + 3 + rank, dtype=np.float64)  # shares of 3 and 4
        gathered = ranks.gather(local)
        both = ranks.gather(np.zeros(0) if rank == 0 else np.ones(2))  # an empty share
        # a: a gradient on both ranks; b: on rank 1 only; c: on neither (AdamW must skip it).
        a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            b.grad = torch.tensor([1.0, 2.0, 3.0])
        ranks.sum_gradients([a, b, c])
        sums = ranks.sum([rank + 0.5, 1])
        if rank == 0:
            np.savez(out, gathered=gathered, both=both, a=a.grad.numpy(), b=b.grad.numpy(), c=np.array(c.grad is None),
                     sums=np.array(sums), any=np.array([ranks.any(False), ranks.any(rank == 0)]))
        else:
            ranks.any(False), ranks.any(rank == 0)
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collectives_over_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "result.npz"
    ctx = torch.multiprocessing.start_processes(_rank_body, args=(_free_port(), str(out)), nprocs=2,
                                                start_method="spawn", join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):  # raises when a rank fails
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    got = np.load(out)
    np.testing.assert_array_equal(got["gathered"], [0, 1, 2, 10, 11, 12, 13])
    np.testing.assert_array_equal(got["both"], [1, 1])
    np.testing.assert_array_equal(got["a"], [3, 3, 3])
    np.testing.assert_array_equal(got["b"], [1, 2, 3])
    assert bool(got["c"])
    np.testing.assert_array_equal(got["sums"], [2.0, 2.0])
    np.testing.assert_array_equal(got["any"], [False, True])
