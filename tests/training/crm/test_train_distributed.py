"""train-crm under a 2-process torchrun (gloo) against one process: without dropout the same run
(history, selected epoch, weights) to floating-point summation order; rank 1 writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.training.rank_guard import torchrun_cli
from training.cli import app
from training.data.samples import prepare
from training.data.synthetic import generate_synthetic

ARGS = ["--epochs", "3", "--batch-size", "200", "--dropout", "0", "--threads", "1", "--patience", "1"]


def test_two_processes_train_the_crm_as_one(tmp_path) -> None:
    data_dir = tmp_path / "data"
    data = prepare(generate_synthetic(n_users=120, n_items=80, n_interactions=4000, seed=3))
    data.save(data_dir)
    emb = np.random.default_rng(0).normal(size=(len(data.items) + 1, 16)).astype(np.float32)
    emb[0] = 0
    np.save(data_dir / "embeddings.npy", emb)
    one, two = tmp_path / "out" / "one", tmp_path / "out" / "two"

    torch.set_num_threads(1)
    result = CliRunner().invoke(app, ["train-crm", "--data", str(data_dir), "--out", str(one), *ARGS])
    assert result.exit_code == 0, result.output
    done = torchrun_cli(tmp_path / "out", "train-crm", "--data", str(data_dir), "--out", str(two), *ARGS)
    assert done.stdout.count("CRM in") == 1  # rank 0 alone reports

    h1, h2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert [h["epoch"] for h in h2] == [h["epoch"] for h in h1]
    assert [h["train_loss"] for h in h2] == pytest.approx([h["train_loss"] for h in h1], rel=1e-5)
    assert [h["valid_auc"] for h in h2] == pytest.approx([h["valid_auc"] for h in h1], abs=1e-5)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["test"]["auc"] == pytest.approx(m1["test"]["auc"], abs=1e-5)
    w1, w2 = load_file(one / "weights.safetensors"), load_file(two / "weights.safetensors")
    assert w1.keys() == w2.keys()
    # The attention units' last bias shifts every behaviour's score alike, which their softmax ignores:
    # its gradient is rounding noise, which AdamW scales up to whole steps, so it is no measure of the run.
    ignored = {"din.mlp.2.bias", "recent_attn.mlp.2.bias"}
    assert ignored <= w1.keys()
    for key in w1.keys() - ignored:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)
