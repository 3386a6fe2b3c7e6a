"""The offline pipeline end to end through the real command line, on synthetic data."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from service.bundle import load_bundle
from training.cli import app

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    invoke("prepare", "--format", "synthetic", "--out", str(data), "--n-users", "150", "--n-items", "120",
           "--n-interactions", "6000")
    invoke("embed", "--data", str(data))
    invoke("train-crm", "--data", str(data), "--epochs", "3", "--batch-size", "256")
    return root, data


def test_prepare_embed_train(pipeline) -> None:
    _, data = pipeline
    emb = np.load(data / "embeddings.npy")
    assert emb.shape == (121, 384)
    np.testing.assert_allclose(np.linalg.norm(emb[1:], axis=1), 1.0, rtol=1e-5)
    assert not emb[0].any()
    metrics = json.loads((data / "crm" / "metrics.json").read_text())
    assert metrics["test"]["auc"] > 0.6


def test_evaluate_prints_all_models(pipeline) -> None:
    _, data = pipeline
    out = invoke("evaluate", "--data", str(data))
    for name in ("item popularity", "logistic regression", "CRM"):
        assert name in out
    rows = json.loads((data / "eval" / "report.json").read_text())
    assert {r["split"] for r in rows} == {"valid", "test"}


def test_export_writes_a_loadable_bundle(pipeline) -> None:
    root, data = pipeline
    invoke("evaluate", "--data", str(data))
    invoke("export", "--data", str(data), "--version", "v1", "--store", str(root / "store"))
    bundle = load_bundle(root / "store" / "v1")
    assert bundle.manifest.components["crm"].kind == "sim-din"
    assert bundle.load_npy("items/embeddings.npy").shape == (121, 384)
    assert "evaluation" in bundle.manifest.metrics
    again = runner.invoke(app, ["export", "--data", str(data), "--version", "v1", "--store", str(root / "store")])
    assert again.exit_code == 2 and "exists" in again.output


def test_prototypes_need_a_lora(pipeline) -> None:
    root, data = pipeline
    result = runner.invoke(app, ["export", "--data", str(data), "--version", "p1", "--store", str(root / "store"),
                                 "--prototypes", "4"])
    assert result.exit_code == 2 and "--llm" in result.output
    negative = runner.invoke(app, ["export", "--data", str(data), "--version", "p2", "--store", str(root / "store"),
                                   "--prototypes", "-1"])
    assert negative.exit_code == 2 and "--prototypes" in negative.output


def test_bad_input_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "u.data").write_text("1\t1\tx\t5\n")
    result = runner.invoke(app, ["prepare", "--format", "ml-100k", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "error:" in result.output
    missing = runner.invoke(app, ["train-crm", "--data", str(tmp_path / "nothing")])
    assert missing.exit_code != 0


def test_drop_unknown_items_is_refused_where_it_cannot_apply(tmp_path) -> None:
    result = runner.invoke(app, ["prepare", "--format", "ml-100k", "--data-dir", str(tmp_path), "--drop-unknown-items",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "applies to csv and ml-latest" in result.output
