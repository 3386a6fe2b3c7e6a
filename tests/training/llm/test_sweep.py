"""``reclora sweep`` on the shared world (synthetic data, tiny Llama): a 2-run grid trained, selected
on validation, the test subset scored once for the selected run only, and resumed without training
again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app
from training.data.samples import PreparedData
from training.llm.fusion_fit import validation_subset
from training.llm.sweep import Setting, SweepConfig, grid, not_told_apart, resolve_samples
from training.metrics import auc_standard_error

runner = CliRunner()
TINY = ["--temperature", "1", "--n-samples", "16", "--epochs", "1", "--lr", "5e-3", "--valid-samples", "24",
        "--n-test", "40", "--k-text", "3", "--batch-size", "8", "--grad-accum", "1", "--rank", "4",
        "--evals-per-epoch", "1", "--dtype", "float32", "--prompt-form", "per-target"]


def sweep(world, out: Path, *args: str):
    return runner.invoke(app, ["sweep", "--data", str(world.data_dir), "--crm", str(world.crm_dir),
                               "--base-model", str(world.base_dir), "--out", str(out), *TINY, *args])


def test_a_two_run_grid_is_trained_selected_tested_once_and_resumed(world, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = sweep(world, out, "--n-meta", "2,4")
    assert first.exit_code == 0, first.output
    table = json.loads((out / "sweep.json").read_text())
    rows = {r["run"]: r for r in table["rows"]}
    assert set(rows) == {"meta2-temp1-n16-ep1-lr0.005", "meta4-temp1-n16-ep1-lr0.005"}
    for name, row in rows.items():
        assert row["status"] == "trained" and row["instances"] == 32  # two ReiT views of 16 samples
        assert 0.0 <= row["valid_auc"] <= 1.0 and row["train_seconds"] > 0
        trained = json.loads((out / "runs" / name / "train.json").read_text())
        assert trained["config"]["lora"]["n_meta"] == row["n_meta"] and trained["config"]["valid_samples"] == 24
    assert table["selected"] == max(rows.values(), key=lambda r: r["valid_auc"])["run"]
    assert table["selected_on"] == "valid_auc"
    test = json.loads((out / "test.json").read_text())
    assert test["run"] == table["selected"] and test["n"] == 40 and {"llm_auc", "crm_auc", "fused_auc"} <= set(test)
    markdown = (out / "sweep.md").read_text()
    assert all(name in markdown for name in rows) and f"**{table['selected']}**" in markdown
    assert "selected run only" in markdown and markdown.count("| meta") == 2
    positives = int(validation_subset(PreparedData.load(world.data_dir), 24, 0)["label"].sum())
    assert (table["valid_positives"], table["valid_negatives"]) == (positives, 24 - positives)
    for row in rows.values():
        assert row["valid_auc_se"] == pytest.approx(auc_standard_error(row["valid_auc"], table["valid_positives"],
                                                                       table["valid_negatives"]))
        assert f"{row['valid_auc_se']:.4f}" in markdown
    assert table["not_told_apart"] == not_told_apart(table["rows"], rows[table["selected"]]) and "± SE" in markdown

    tested_at = (out / "test.json").stat().st_mtime_ns
    again = sweep(world, out, "--n-meta", "2,4")
    assert again.exit_code == 0, again.output
    resumed = json.loads((out / "sweep.json").read_text())
    assert {r["status"] for r in resumed["rows"]} == {"resumed"} and "training" not in again.output
    assert [r["valid_auc"] for r in resumed["rows"]] == [r["valid_auc"] for r in table["rows"]]
    assert (out / "test.json").stat().st_mtime_ns == tested_at  # the test subset is not scored again


def test_max_runs_takes_a_seeded_prefix_of_the_grid() -> None:
    config = SweepConfig(n_meta=[8, 16], temperature=[1.0, 5.0], n_samples=["2048", "10%"], epochs=[1], lr=[1e-3])
    everything = grid(config, n_train=76249)
    assert len(everything) == 8 and Setting(16, 5.0, 7625, 1, 1e-3) in everything  # 10% of the training split
    config.max_runs = 3
    three = grid(config, 76249)
    config.max_runs = 5
    assert grid(config, 76249)[:3] == three and len(set(three)) == 3  # a larger budget extends the same order
    config.seed = 1
    assert grid(config, 76249) != grid(SweepConfig(**{**config.__dict__, "seed": 0}), 76249)


def test_bad_grids_are_clear_errors(world, tmp_path: Path) -> None:
    assert resolve_samples("10%", 1000) == 100 and resolve_samples("5000", 1000) == 1000
    with pytest.raises(ValueError, match="counts or percentages"):
        resolve_samples("lots", 1000)
    bad = [(["--n-meta", "2,x"], "--n-meta must be comma-separated ints"),
           (["--n-meta", "2", "--max-runs", "0"], "--max-runs must be at least 1"),
           (["--n-meta", "2", "--n-samples", "ten"], "counts or percentages"),
           (["--n-meta", "2", "--objective", "vibes"], "objective must be one of")]
    for args, message in bad:
        result = sweep(world, tmp_path / "bad", *args)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "bad" / "runs").exists()


def test_the_fused_objective_is_selected_on_its_fused_auc_and_a_changed_setting_is_refused(world, tmp_path) -> None:
    out = tmp_path / "sweep"
    result = sweep(world, out, "--n-meta", "2", "--objective", "fused")
    assert result.exit_code == 0, result.output
    table = json.loads((out / "sweep.json").read_text())
    (row,) = table["rows"]
    assert table["selected_on"] == "valid_fused_auc" and {"valid_fused_auc", "valid_auc"} <= set(row)
    trained = json.loads((out / "runs" / row["run"] / "train.json").read_text())
    assert row["valid_fused_auc"] == trained["best_valid_auc"]
    test = json.loads((out / "test.json").read_text())
    assert test["fusion"]["source"] == "objective"  # the fusion trained with the LoRA, not one fitted here
    assert "valid fused AUC" in (out / "sweep.md").read_text()

    changed = sweep(world, out, "--n-meta", "2")  # the same run directory, another objective
    assert changed.exit_code == 2 and "trained with other settings (objective)" in changed.output


def test_a_sweep_with_collaborative_tokens_trains_and_tests_every_run_with_them(world, tmp_path) -> None:
    out = tmp_path / "sweep"
    result = sweep(world, out, "--n-meta", "2", "--collab-tokens")
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "sweep.json").read_text())["rows"]
    assert json.loads((out / "runs" / row["run"] / "train.json").read_text())["config"]["collab_tokens"] is True
    assert (out / "runs" / row["run"] / "collab.safetensors").is_file()
    test = json.loads((out / "test.json").read_text())
    assert test["n"] == 40 and 0.0 <= test["llm_auc"] <= 1.0  # scored with each candidate's item vector


def test_runs_within_two_standard_errors_of_the_selected_one_are_not_told_apart() -> None:
    rows = [{"run": "best", "valid_auc": 0.70, "valid_auc_se": 0.02},
            {"run": "close", "valid_auc": 0.67, "valid_auc_se": 0.02},  # 0.03 below: within 2 SE
            {"run": "wide", "valid_auc": 0.62, "valid_auc_se": 0.05},  # 0.08 below, its own SE is 0.05
            {"run": "far", "valid_auc": 0.65, "valid_auc_se": 0.02},  # 0.05 below: more than 2 SE
            {"run": "fused", "valid_auc": 0.50, "valid_fused_auc": 0.69, "valid_auc_se": 0.02}]  # fused AUC selects
    assert not_told_apart(rows, rows[0]) == ["close", "wide", "fused"]
