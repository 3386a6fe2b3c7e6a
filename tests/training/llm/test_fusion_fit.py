"""The export's fusion decision: fused only where it ranks validation better than the CRM alone.

The decision itself on planted scores; then real exports of the shared world, whose barely trained
LoRA on a tiny Llama scores like noise, in both directions: beside a CRM that ranks validation
well, a fusion that ranks as the LLM does loses and the bundle serves the CRM; beside a CRM that
ranks it upside down, a fitted fusion turns it around, wins, and the bundle serves fused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from tests.world_support import item_rate_crm

from service.bundle import BundleError, load_bundle
from service.model import Fusion, load_model
from training.export.crm_bundle import export_crm_bundle
from training.llm.fusion_fit import FusionOptions, ValidationScores, decide, validation_subset
from training.slices import SampleSlices


def planted(n: int, llm_signal: float, seed: int = 0) -> ValidationScores:
    """Labels, a CRM that sees them through noise, and an LLM that sees them with ``llm_signal``
    through noise of its own (0: an LLM that knows nothing)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    crm = sigmoid(1.0 * (2 * y - 1) + rng.normal(size=n))
    llm = sigmoid(llm_signal * (2 * y - 1) + rng.normal(size=n))
    return ValidationScores(llm, crm, y, seed)


def test_an_informative_llm_is_served_fused() -> None:
    decision = decide(planted(500, llm_signal=1.0), None, "fitted")
    v = decision.fusion.validation
    assert decision.fusion.serve == "fused" and v.fused_auc > v.crm_auc and v.n == 500
    assert decision.fusion.w_llm > 0.5 and decision.source == "fitted"


@pytest.mark.parametrize("seed", range(5))
def test_an_llm_that_knows_nothing_leaves_the_crm_alone(seed: int) -> None:
    decision = decide(planted(500, llm_signal=0.0, seed=seed), None, "fitted")
    v = decision.fusion.validation
    assert decision.fusion.serve == "crm", v
    assert v.fused_auc <= v.crm_auc  # cross-fitted: noise fitted in sample does not count
    assert 0.4 < v.llm_auc < 0.6


def test_a_given_fusion_is_judged_as_it_is_and_a_forced_one_is_still_measured() -> None:
    scores = planted(400, llm_signal=1.0)
    llm_only = Fusion(1.0, 0.0, 0.0)  # ranks as the LLM does: worse than the CRM here
    decision = decide(scores, llm_only, "objective")
    assert decision.source == "objective" and decision.fusion.serve == "crm"
    assert decision.fusion.validation.fused_auc == pytest.approx(decision.fusion.validation.llm_auc)
    assert (decision.fusion.w_llm, decision.fusion.w_crm) == (1.0, 0.0)
    forced = decide(scores, llm_only, "objective", serve="fused")
    assert forced.forced and forced.fusion.serve == "fused"
    assert forced.fusion.validation == decision.fusion.validation


def test_a_subset_without_both_labels_is_a_clear_error() -> None:
    scores = planted(100, 1.0)
    with pytest.raises(ValueError, match="two of each label"):
        decide(ValidationScores(scores.llm, scores.crm, np.ones(100, int), 0), None, "fitted")
    with pytest.raises(ValueError, match="at least"):
        FusionOptions(samples=3)
    with pytest.raises(ValueError, match="serve"):
        FusionOptions(serve="llm")  # type: ignore[arg-type]


def support_slices(support: np.ndarray) -> SampleSlices:
    """Slices of planted samples: their item support, users and histories alike."""
    return SampleSlices(support, np.zeros(len(support), np.int64), np.full(len(support), 50))


def planted_by_support(n: int, seed: int = 0) -> ValidationScores:
    """A CRM that ranks well-supported items and an LLM that ranks cold ones (support below 10)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    support = rng.choice([0, 4, 30, 300], n)
    cold = support < 10
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    crm = sigmoid(np.where(cold, 0.0, 1.5 * (2 * y - 1)) + rng.normal(size=n))
    llm = sigmoid(np.where(cold, 1.5 * (2 * y - 1), 0.0) + rng.normal(size=n))
    return ValidationScores(llm, crm, y, seed, support_slices(support))


def test_a_fusion_by_item_support_is_served_where_it_beats_the_plain_one_and_the_crm() -> None:
    scores = planted_by_support(1000)
    decision = decide(scores, None, "fitted")
    weights, v = decision.fusion.item_support, decision.fusion.validation
    assert weights is not None and decision.fusion.serve == "fused", decision.summary()
    assert v.fused_auc == decision.by_support_auc > v.crm_auc
    assert weights.w_llm[0] > weights.w_llm[3] and weights.w_crm[3] > weights.w_crm[0]  # LLM on cold, CRM on warm
    plain = decide(ValidationScores(scores.llm, scores.crm, scores.labels, scores.seed), None, "fitted")
    assert plain.fusion.item_support is None and plain.by_support_auc is None
    assert decision.by_support_auc > plain.fusion.validation.fused_auc
    assert decision.summary()["by_item_support"] is True


@pytest.mark.parametrize("seed", range(3))
def test_weights_by_support_are_not_served_where_support_tells_nothing(seed: int) -> None:
    base = planted(600, llm_signal=1.0, seed=seed)
    support = np.random.default_rng(seed + 10).choice([0, 4, 30, 300], 600)
    decision = decide(ValidationScores(base.llm, base.crm, base.labels, seed, support_slices(support)), None, "fitted")
    plain = decide(base, None, "fitted")
    served_by_support = decision.fusion.item_support is not None
    assert served_by_support == (decision.by_support_auc > plain.fusion.validation.fused_auc)
    assert decision.fusion.validation.fused_auc == max(decision.by_support_auc, plain.fusion.validation.fused_auc)


def test_the_validation_draw_is_llm_reports_and_nested(world) -> None:
    small, large = validation_subset(world.data, 50, 0), validation_subset(world.data, 120, 0)
    valid = world.data.split("valid")
    assert small.equals(valid.sample(n=50, random_state=0))  # llm-report's and train-llm's draw
    assert small.equals(large.iloc[:50])  # a smaller draw is a prefix of a larger one


@pytest.fixture(scope="module")
def crms(world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crms")
    return {"good": item_rate_crm(world, root / "good"), "upside-down": item_rate_crm(world, root / "bad", -1.0)}


# float32: the same scores, hence the same decision, on every CPU
OPTIONS = dict(samples=200, dtype="float32")


def exported(world, crm_dir: Path, store: Path, version: str, *, llm_dir: Path | None = None, **kwargs) -> dict:
    path = export_crm_bundle(world.data_dir, crm_dir, store, version, llm_dir=llm_dir or world.root / "lora",
                             base_model=world.base_dir, **kwargs)
    bundle = load_bundle(path)
    fusion = json.loads((path / "fusion.json").read_text())
    assert bundle.manifest.components["llm"].config["serve"] == fusion["serve"]
    assert load_model(path).fusion == Fusion.from_json(fusion)
    metrics = bundle.manifest.metrics["fusion"]
    assert metrics["serve"] == fusion["serve"] and metrics["fused_auc"] == fusion["validation"]["fused_auc"]
    return {"fusion": fusion, "metrics": metrics}


def llm_only_report(root: Path) -> Path:
    """A report directory whose fusion ranks as the LLM alone does."""
    root.mkdir()
    (root / "fusion.json").write_text(json.dumps({"w_llm": 1.0, "w_crm": 0.0, "bias": 0.0}))
    (root / "report.json").write_text(json.dumps({"note": "test fixture"}))
    return root


def test_export_serves_the_crm_where_the_fusion_does_not_beat_it(world, crms, tmp_path: Path) -> None:
    out = exported(world, crms["good"], tmp_path, "v1", llm_report=llm_only_report(tmp_path / "report"),
                   fusion=FusionOptions(**OPTIONS))
    fusion, metrics = out["fusion"], out["metrics"]
    v = fusion["validation"]
    assert fusion["serve"] == "crm" and not metrics["forced"], v
    assert v["fused_auc"] == pytest.approx(v["llm_auc"])
    assert v["llm_auc"] < 0.6 < v["crm_auc"]  # the LLM is noise, the CRM is not
    assert v["n"] == min(200, len(world.data.split("valid"))) and v["seed"] == 0
    assert metrics["source"] == "report" and metrics["fused_auc_method"] == "as given"
    assert load_bundle(tmp_path / "v1").manifest.metrics["llm_report"] == {"note": "test fixture"}


def test_export_serves_fused_where_the_fitted_fusion_beats_the_crm(world, crms, tmp_path: Path) -> None:
    out = exported(world, crms["upside-down"], tmp_path, "v1", fusion=FusionOptions(**OPTIONS))
    v = out["fusion"]["validation"]
    assert out["fusion"]["serve"] == "fused", v
    assert v["crm_auc"] < 0.4 < 0.6 < v["fused_auc"]  # the fitted fusion turns the CRM's ranking around
    assert out["fusion"]["w_crm"] < 0 and out["metrics"]["source"] == "fitted"
    assert out["metrics"]["fused_auc_method"] == "5-fold cross-fitted"
    slices = out["metrics"]["slices"]  # the decision's figures by slice, on the same validation samples
    assert {r["dimension"] for r in slices} == {"item support", "user support", "history length"}
    assert sum(r["n"] for r in slices if r["dimension"] == "item support") == out["fusion"]["validation"]["n"]


def test_the_catalog_records_each_items_training_support(world, crms, tmp_path: Path) -> None:
    from service.model.catalog import SUPPORT_COLUMN

    path = export_crm_bundle(world.data_dir, crms["good"], tmp_path, "v1")
    catalog = load_bundle(path).load_parquet_pandas("items/catalog.parquet")
    train = world.data.split("train")
    expected = catalog["item_idx"].map(train.groupby("item_idx").size()).fillna(0).astype(int)
    assert (catalog[SUPPORT_COLUMN] == expected).all() and expected.gt(0).any()
    model = load_model(path)
    assert model.catalog.support is not None
    assert model.catalog.support[catalog["item_idx"].to_numpy()].tolist() == expected.tolist()


def test_a_fitted_fusion_serves_fused_exactly_when_it_beats_the_crm(world, crms, tmp_path: Path) -> None:
    out = exported(world, crms["good"], tmp_path, "v1", fusion=FusionOptions(**OPTIONS))
    v = out["fusion"]["validation"]
    assert out["fusion"]["serve"] == ("fused" if v["fused_auc"] > v["crm_auc"] else "crm")
    assert out["metrics"]["fused_auc_in_sample"] >= v["fused_auc"]  # fitting noise flatters in sample only


def test_the_reports_fusion_wins_over_the_objectives(world, crms, tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    shutil.copytree(world.root / "lora", lora)
    (lora / "fusion.json").write_text(json.dumps({"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0}))  # the objective's
    out = exported(world, crms["good"], tmp_path / "store", "objective", llm_dir=lora,
                   fusion=FusionOptions(**OPTIONS))
    assert out["metrics"]["source"] == "objective"
    assert out["metrics"]["weights"] == {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0}
    assert out["metrics"]["fused_auc"] == out["metrics"]["fused_auc_in_sample"]  # judged as it is
    out = exported(world, crms["good"], tmp_path / "store", "report", llm_dir=lora,
                   llm_report=llm_only_report(tmp_path / "report"), fusion=FusionOptions(**OPTIONS))
    assert out["metrics"]["source"] == "report" and out["metrics"]["weights"]["w_crm"] == 0.0


def test_the_export_command_prints_the_decision_and_needs_the_base_model(world, tmp_path: Path) -> None:
    from training.cli import app

    runner = CliRunner()
    args = ["export", "--data", str(world.data_dir), "--crm", str(world.crm_dir), "--store", str(tmp_path),
            "--llm", str(world.root / "lora"), "--fusion-samples", "100", "--fusion-dtype", "float32"]
    result = runner.invoke(app, [*args, "--version", "v1", "--base-model", str(world.base_dir), "--serve", "fused"])
    assert result.exit_code == 0, result.output
    assert "serve fused (forced): valid AUC fused" in result.output and "on 100 samples (seed 0)" in result.output
    missing = runner.invoke(app, [*args, "--version", "v2"])
    assert missing.exit_code == 2 and "--base-model" in missing.output
    bad = runner.invoke(app, [*args, "--version", "v3", "--base-model", str(world.base_dir), "--serve", "maybe"])
    assert bad.exit_code == 2 and "serve must be auto, fused or crm" in bad.output
    with pytest.raises(BundleError, match="base model"):
        export_crm_bundle(world.data_dir, world.crm_dir, tmp_path, "v4", llm_dir=world.root / "lora")


def test_llm_report_writes_a_fusion_with_its_decision(world, tmp_path: Path) -> None:
    from training.llm.report import run_report

    result = run_report(world.data_dir, world.crm_dir, world.base_dir, None, world.root / "lora", tmp_path,
                        n_test=40, n_valid=60, k_text=3)
    fusion = Fusion.from_json(json.loads((tmp_path / "fusion.json").read_text()))
    assert fusion.validation is not None and fusion.validation.n == 60 and fusion.validation.seed == 0
    assert result["fusion_decision"]["serve"] == fusion.serve
    assert result["fusion_decision"]["fused_auc_method"] == "5-fold cross-fitted"
    assert f"Serve: {fusion.serve}" in (tmp_path / "report.md").read_text()
