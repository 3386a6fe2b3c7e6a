"""Training and scoring under ``torchrun``: the process group, each rank's share, and the few
collectives the offline jobs need.

``torchrun --nproc-per-node N -m training.cli train-llm ...`` (or multi-node torchrun) sets
RANK, WORLD_SIZE and LOCAL_RANK; ``process_group`` then joins the group, gloo on CPUs and nccl on
GPUs (one device per LOCAL_RANK). A plain run (no WORLD_SIZE, or 1) never touches
torch.distributed: ``Ranks()`` is one process and every collective below returns its input.

A distributed job computes the same global order on every rank (the same seed) and gives each
rank a contiguous share of a step's (or a scoring pass's) samples; gathering the shares in rank
order restores the single-process order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; the default is a single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs, state and messages."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items (sizes differ by at most one; may be empty)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def barrier(self) -> None:
        if self.distributed:
            _dist().barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks, in float64 (loss sums, counts)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        _dist().all_reduce(tensor)
        return tensor.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes: a decision every rank must take alike (e.g. a time-based stop)."""
        return self.sum([float(flag)])[0] > 0 if self.distributed else flag

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, in one flat all-reduce.

        A parameter that got no gradient on any rank keeps none (as AdamW then skips it, exactly
        as a single process would); one that got a gradient somewhere is summed with zeros where
        it got none."""
        if not self.distributed:
            return
        present = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        _dist().all_reduce(present)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params]).to(self.device)
        _dist().all_reduce(flat)
        offset = 0
        for p, seen in zip(params, present.tolist()):
            n = p.numel()
            if seen:
                p.grad = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype).clone()
            offset += n

    def gather(self, local: np.ndarray) -> np.ndarray:
        """Every rank's ``local`` 1-D array concatenated in rank order, on every rank (shares may
        differ in length: they are padded to the longest for the all-gather, then cut)."""
        if not self.distributed:
            return local
        values = torch.as_tensor(np.ascontiguousarray(local, dtype=np.float64), device=self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        _dist().all_gather(sizes, torch.tensor([values.numel()], dtype=torch.int64, device=self.device))
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        padded = torch.zeros(longest, dtype=torch.float64, device=self.device)
        padded[: values.numel()] = values
        parts = [torch.empty(longest, dtype=torch.float64, device=self.device) for _ in range(self.world)]
        _dist().all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu().numpy()


def _dist():
    import torch.distributed as dist

    return dist


def launched_world() -> int:
    """WORLD_SIZE as torchrun sets it; 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> Ranks:
    """The ranks of the process group this process has joined (``process_group``), else a single process."""
    if launched_world() <= 1:
        return Ranks()
    dist = _dist()
    if not dist.is_initialized():
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), local, device)


def backend_for(device: str) -> str:
    """nccl where the job runs on CUDA, gloo on CPUs (``device`` as ``LLMTrainConfig.device``)."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


@contextmanager
def process_group(device: str = "auto") -> Iterator[Ranks]:
    """Join torchrun's process group for the block (and leave it after); a plain run gets
    ``Ranks()`` and torch.distributed is never imported. On CUDA each process takes the GPU of
    its LOCAL_RANK, so a job's ``cuda`` means that GPU. A group already joined is used as is."""
    if launched_world() <= 1:
        yield Ranks()
        return
    dist = _dist()
    if dist.is_initialized():
        yield current()
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def rank_step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s random draws within optimizer step ``step`` of a distributed run
    (dropout): distinct per rank and step, and a function of the step alone, so a resumed run draws
    what the uninterrupted one would have."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] % (2**63 - 1))
