"""A training run's mid-run state, so that a run longer than one sitting continues where it stopped.

The state is what the next optimizer step depends on: the LoRA's current (not best) weights, the
AdamW moments, the learning-rate schedule, the random generators, the epoch's instance order and
the position in it, and the history and best checkpoint so far. Tensors go to safetensors and the
rest to JSON, never to a pickle: ``torch.save``'s format would run code when loaded. A resumed run
continues bit for bit as the uninterrupted one would have (on the same machine and threads).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESUME_DIR = "resume"
TENSORS, META = "state.safetensors", "state.json"


@dataclass
class Progress:
    """Where the loop stands: the counters it carries from step to step."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # instances of ``order`` already stepped through in ``epoch``
    running: float = 0.0
    tokens: int = 0
    seen: int = 0
    seconds: float = 0.0  # training time spent before this sitting
    best_auc: float = -1.0
    history: list = field(default_factory=list)
    best_fusion: dict | None = None


def save_state(out_dir: Path, config: dict, progress: Progress, order: list[int], trainable: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, schedule, extra: dict[str, torch.Tensor],
               generator: torch.Generator) -> None:
    """Write the state to ``out_dir/resume`` atomically (a new directory renamed over the old one)."""
    tensors = {f"lora.{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["order"] = torch.tensor(order, dtype=torch.int64)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    meta = {"config": config, "progress": progress.__dict__, "param_groups": opt["param_groups"],
            "schedule": schedule.state_dict()}
    final, tmp = out_dir / RESUME_DIR, out_dir / f"{RESUME_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / TENSORS)
    (tmp / META).write_text(json.dumps(meta))
    old = out_dir / f"{RESUME_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_state(out_dir: Path) -> tuple[Progress, dict, dict[str, torch.Tensor]] | None:
    """(progress, meta, tensors) of a run stopped in ``out_dir``, else None. ``meta["config"]`` is
    the settings it ran with, for the caller to compare with its own."""
    path = out_dir / RESUME_DIR
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        return None
    meta = json.loads((path / META).read_text())
    return Progress(**meta["progress"]), meta, load_file(path / TENSORS)


def restore(meta: dict, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, schedule,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:
    """Put the optimizer, schedule and generators back; returns (LoRA weights, extra tensors, order)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    lora = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return lora, extra, tensors["order"].tolist()


def clear_state(out_dir: Path) -> None:
    """The run finished: its mid-run state is no longer needed."""
    shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)
