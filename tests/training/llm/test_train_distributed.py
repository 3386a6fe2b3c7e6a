"""train-llm and llm-report under a 2-process torchrun (gloo, CPU, a tiny model) against one process.

The distributed run shares every optimizer step out at the same global batch, so it must give the
single process's loss curve and selected step, and its weights, to floating-point summation order;
stopped and restarted it must continue to the same result; rank 1 must write nothing (the runs go
through ``tests.training.rank_guard``, which makes any write of rank 1 under the output folder
fail the job); and distributed scoring must return one process's scores in the same order.

The ReLLa-style LoRA with the fused objective is trained here: it has no gate, so no dropout, and
the fused objective's w and b are reduced beside the LoRA's gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.training.rank_guard import torchrun_cli
from training.cli import app
from training.llm.report import SCORES_DIR
from training.llm.resume import RESUME_DIR

# 17 samples in two views: 34 instances a epoch, steps of 3 x 3 = 9 (the last of 7): shares of 4 and 5, then 3 and 4.
# 12 validation samples are one scoring batch of 16: rank 0's share is empty, rank 1 scores them all.
TRAIN = ["--mode", "rella", "--objective", "fused", "--n-samples", "17", "--k-text", "3", "--epochs", "2",
         "--batch-size", "3", "--grad-accum", "3", "--lr", "5e-3", "--rank", "4", "--valid-samples", "12",
         "--evals-per-epoch", "2", "--dtype", "float32", "--threads", "1", "--checkpoint-every", "0",
         "--prompt-form", "per-target"]
REPORT = ["--n-test", "30", "--n-valid", "21", "--batch-size", "4", "--k-text", "3", "--dtype", "float32"]


@pytest.fixture(scope="module")
def world(llm_world):
    """The tiny world on disk, as the command line reads it; the outputs go under root/out."""
    root, data, emb, base = llm_world
    data_dir = root / "data"
    data.save(data_dir)
    np.save(data_dir / "embeddings.npy", emb)
    (root / "out").mkdir()
    return root, data_dir, base


def common(data_dir: Path, base: Path, root: Path) -> list[str]:
    return ["--data", str(data_dir), "--base-model", str(base), "--crm", str(root / "crm")]


def single(*args: str) -> str:
    torch.set_num_threads(1)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def torchrun(root: Path, *args: str):
    """``reclora ARGS`` in 2 processes of torchrun, rank 1 forbidden to write under root/out."""
    return torchrun_cli(root / "out", *args)


@pytest.fixture(scope="module")
def runs(world):
    """(the single-process run's directory, the 2-process run's)."""
    root, data_dir, base = world
    one, two = root / "out" / "one", root / "out" / "two"
    single("train-llm", *common(data_dir, base, root), "--out", str(one), *TRAIN)
    torchrun(root, "train-llm", *common(data_dir, base, root), "--out", str(two), *TRAIN)
    return one, two


def summary(out: Path) -> dict:
    return json.loads((out / "train.json").read_text())


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol)


def test_two_processes_train_as_one_at_the_same_global_batch(runs) -> None:
    one, two = (summary(d) for d in runs)
    assert two["processes"] == 2 and "processes" not in one
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]] == [2, 4, 6, 8]
    assert [h["train_loss"] for h in two["history"]] == pytest.approx([h["train_loss"] for h in one["history"]],
                                                                       rel=1e-5)
    assert [h["valid_auc"] for h in two["history"]] == pytest.approx([h["valid_auc"] for h in one["history"]],
                                                                      abs=1e-6)
    best = [max(s["history"], key=lambda h: h["valid_auc"])["step"] for s in (one, two)]
    assert best[0] == best[1]
    assert two["best_valid_auc"] == pytest.approx(one["best_valid_auc"], abs=1e-6)
    for key in ("w_crm", "bias"):
        assert two["fusion"][key] == pytest.approx(one["fusion"][key], rel=1e-4, abs=1e-6)
    assert_same_weights(*runs, atol=1e-5)
    assert {p.name for p in runs[1].iterdir()} == {p.name for p in runs[0].iterdir()}


def test_a_stopped_distributed_run_continues_to_the_same_result(world, runs) -> None:
    root, data_dir, base = world
    out = root / "out" / "stopped"
    # --stop-after-minutes 0 stops after the first step (every rank agrees on it), the state saved by rank 0.
    first = torchrun(root, "train-llm", *common(data_dir, base, root), "--out", str(out), *TRAIN,
                     "--stop-after-minutes", "0")
    assert "stopped at step 1 of 8" in first.stdout
    assert (out / RESUME_DIR).is_dir() and not (out / "train.json").exists()
    torchrun(root, "train-llm", *common(data_dir, base, root), "--out", str(out), *TRAIN)
    assert not (out / RESUME_DIR).exists()
    whole, resumed = summary(runs[1]), summary(out)
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in whole["history"]], rel=1e-6)
    assert [h["valid_auc"] for h in resumed["history"]] == [h["valid_auc"] for h in whole["history"]]
    assert_same_weights(runs[1], out, atol=1e-6)


def test_distributed_report_scores_as_one_process_in_the_same_order(world, runs) -> None:
    root, data_dir, base = world
    one, two = root / "out" / "report-one", root / "out" / "report-two"
    args = [*common(data_dir, base, root), "--rella", str(runs[0]), *REPORT]
    single("llm-report", *args, "--out", str(one))
    torchrun(root, "llm-report", *args, "--out", str(two))
    kept = sorted(p.name for p in (one / SCORES_DIR).glob("*.npy"))
    assert len(kept) == 4  # zero-shot and ReLLa-style, test and valid
    assert kept == sorted(p.name for p in (two / SCORES_DIR).glob("*.npy"))
    for name in kept:
        a, b = np.load(one / SCORES_DIR / name), np.load(two / SCORES_DIR / name)
        assert len(a) in (30, 21)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    rows = {json.dumps(r["model"]): r for r in json.loads((one / "report.json").read_text())["rows"]}
    for r in json.loads((two / "report.json").read_text())["rows"]:
        assert r["auc"] == pytest.approx(rows[json.dumps(r["model"])]["auc"], abs=1e-9)


def test_the_default_shared_form_on_requests_trains_as_one_process(world) -> None:
    """The default form (shared, requests of up to 20): whole requests shared out per step."""
    root, data_dir, base = world
    shared = [a for a in TRAIN if a not in ("--prompt-form", "per-target")] + ["--request-size", "4"]
    one, two = root / "out" / "shared-one", root / "out" / "shared-two"
    single("train-llm", *common(data_dir, base, root), "--out", str(one), *shared)
    torchrun(root, "train-llm", *common(data_dir, base, root), "--out", str(two), *shared)
    a, b = summary(one), summary(two)
    assert a["config"]["prompt_form"] == "shared" and b["processes"] == 2
    assert [h["train_loss"] for h in b["history"]] == pytest.approx([h["train_loss"] for h in a["history"]], rel=1e-5)
    assert [h["valid_auc"] for h in b["history"]] == pytest.approx([h["valid_auc"] for h in a["history"]], abs=1e-6)
    assert_same_weights(one, two, atol=1e-5)
