"""The sample-efficiency study through the real command line, on synthetic data and a tiny Llama."""

import json

import numpy as np
import pytest
from tests.knowledge_support import fabricate_knowledge
from tests.tiny_llama import build_tiny_llama
from typer.testing import CliRunner

from training.cli import app
from training.data.samples import PreparedData
from training.llm.crm_outputs import FrozenCRM, user_representations
from training.llm.loading import load_trained
from training.metrics import binary_metrics
from training.studies.sample_efficiency import StudyConfig, plan_runs
from training.studies.subsets import shared_test_subset, subset_size, train_subset

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_efficiency")
    data = root / "data"
    invoke("prepare", "--format", "synthetic", "--out", data, "--n-users", "60", "--n-items", "50",
           "--n-interactions", "1500")
    prepared = PreparedData.load(data)
    emb = np.random.default_rng(0).normal(size=(len(prepared.items) + 1, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0
    np.save(data / "embeddings.npy", emb)
    invoke("train-crm", "--data", data, "--epochs", "1", "--batch-size", "1024")  # the LLM's user vectors
    knowledge = fabricate_knowledge(prepared, root / "knowledge")
    base = build_tiny_llama(root / "base", hidden_size=32, layers=2)
    return root, data, prepared, knowledge, base


# The study's small settings: two shares, two seeds at the small one, one CRM epoch.
CRM_SIDE = ["--fractions", "0.1,1", "--seeds", "0,1", "--epochs", "1", "--min-batches", "1", "--n-test", "100"]
LLM_SIDE = ["--llm-samples", "16", "--llm-seeds", "0", "--llm-valid-samples", "16", "--k-text", "3",
            "--rank", "2", "--n-meta", "2", "--dtype", "float32"]


def test_training_subsets_are_seeded_nested_and_leave_valid_and_test_alone(world) -> None:
    _, _, data, _, _ = world
    n_train = len(data.split("train"))
    small, large = train_subset(data, 20, 1), train_subset(data, 80, 1)
    assert len(small.split("train")) == 20 and small.meta["n_samples"]["train"] == 20
    assert set(small.split("train")["order"]) < set(large.split("train")["order"])  # nested per seed
    again = train_subset(data, 20, 1)
    assert list(again.split("train")["order"]) == list(small.split("train")["order"])  # reproducible
    assert list(train_subset(data, 20, 2).split("train")["order"]) != list(small.split("train")["order"])
    for split in ("valid", "test"):
        assert small.split(split).equals(data.split(split))
    assert small.events is data.events and small.items is data.items and small.users is data.users
    assert len(data.split("train")) == n_train  # the full dataset is untouched
    assert subset_size(0.1, n_train) == round(0.1 * n_train) and subset_size(1e-9, n_train) == 1
    with pytest.raises(ValueError, match="fraction"):
        subset_size(1.5, n_train)


def test_plan_uses_three_seeds_up_to_ten_percent_and_knowledge_only_when_given() -> None:
    runs = plan_runs(StudyConfig(llm_samples=(64,), llm_models=("rella",)), 1000, knowledge=False, llm=True)
    seeds = {(r.model, r.fraction): {x.seed for x in runs if (x.model, x.fraction) == (r.model, r.fraction)}
             for r in runs}
    assert seeds[("crm", 0.1)] == {0, 1, 2} and seeds[("crm", 0.25)] == {0} and seeds[("crm", 1.0)] == {0}
    assert seeds[("rella", 0.064)] == {0, 1, 2}
    assert not any(r.model == "crm_knowledge" for r in runs)
    with_knowledge = plan_runs(StudyConfig(), 1000, knowledge=True, llm=False)
    assert {r.model for r in with_knowledge} == {"popularity", "logistic", "crm", "crm_knowledge"}
    with pytest.raises(ValueError, match="unknown LLM"):
        plan_runs(StudyConfig(llm_models=("gpt",)), 1000, knowledge=False, llm=True)


def test_study_writes_table_and_figure_and_resumes(world) -> None:
    root, data, prepared, knowledge, base = world
    out = root / "study"
    first = invoke("sample-efficiency", "--data", data, "--out", out, "--no-llm", *CRM_SIDE)
    result = json.loads((out / "sample_efficiency.json").read_text())
    assert {r["model"] for r in result["rows"]} == {"popularity", "logistic", "crm"}  # no knowledge runs
    assert len(result["rows"]) == 3 * 2 + 3  # two seeds at 10%, one at 100%
    assert "pass --knowledge" in first
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert len(finished) == 9

    second = invoke("sample-efficiency", "--data", data, "--out", out, "--knowledge", knowledge,
                    "--base-model", base, "--llm-models", "reclora,rella", *CRM_SIDE, *LLM_SIDE)
    assert second.count("done before, skipped") == 9
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json") if p.name in finished} == finished
    result = json.loads((out / "sample_efficiency.json").read_text())
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"popularity", "logistic", "crm", "crm_knowledge", "reclora", "rella"}
    assert len(rows) == 9 + 3 + 2
    assert result["protocol"]["n_test"] == 100
    for r in rows:
        assert 0.0 <= r["test_auc"] <= 1.0 and r["wall_seconds"] > 0
        assert ("test_full_auc" in r) == (r["model"] not in ("reclora", "rella"))
        assert sum(v["n"] for k, v in r["test_slices"].items() if k.startswith("item support")) == 100
    crm_small = sorted((r for r in rows if r["model"] == "crm" and r["fraction"] == 0.1), key=lambda r: r["seed"])
    assert [r["seed"] for r in crm_small] == [0, 1] and crm_small[0]["n_train_samples"] == subset_size(0.1, len(prepared.split("train")))

    md = (out / "sample_efficiency.md").read_text()
    for label in ("item popularity", "logistic regression", "CRM + knowledge", "RecLoRA LLM", "ReLLa-style LLM"):
        assert f"| {label}" in md
    assert "Test AUC by slice" in md and "item support: 50+ (n=" in md
    assert "full-data CRM" in md and "Knowledge gain at 100%" in md and "Knowledge gain at 10%" in md
    assert result["findings"]["knowledge_gain"]["0.1"]["n_seeds"] == 2
    assert (out / "sample_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The LLM was scored on the seeded test subset `llm-report` uses: rescoring the saved LoRA agrees.
    row = next(r for r in rows if r["model"] == "reclora")
    test = shared_test_subset(prepared, 100, 0)
    scorer = load_trained(out / row["details"]["lora"], base, "float32", k_text=3, device="cpu")
    probs = scorer.score(scorer.prompts(prepared, test, np.load(data / "embeddings.npy"), "semantic"),
                         user_representations(prepared, test, data / "crm", np.load(data / "embeddings.npy")))
    assert binary_metrics(test["label"].to_numpy(), probs)["auc"] == pytest.approx(row["test_auc"], abs=1e-6)

    changed = runner.invoke(app, ["sample-efficiency", "--data", str(data), "--out", str(out), "--no-llm",
                                  *CRM_SIDE[:-1], "300"])
    assert changed.exit_code == 2 and "other settings (n_test" in changed.output


def test_llm_runs_train_and_score_in_the_prompt_form_given_with_collaborative_tokens(world) -> None:
    root, data, prepared, _, base = world
    out = root / "study-shared"
    invoke("sample-efficiency", "--data", data, "--out", out, "--base-model", base, "--llm-models", "reclora",
           "--crm-models", "crm", "--fractions", "1", "--seeds-above", "0", "--epochs", "1", "--n-test", "100",
           *LLM_SIDE, "--prompt-form", "shared", "--request-size", "4", "--collab-tokens")
    result = json.loads((out / "sample_efficiency.json").read_text())
    row = next(r for r in result["rows"] if r["model"] == "reclora")
    train = json.loads((out / row["details"]["lora"] / "train.json").read_text())["config"]
    assert (train["prompt_form"], train["request_size"], train["collab_tokens"]) == ("shared", 4, True)
    assert result["protocol"]["llm_prompt_form"] == "shared"
    assert "LLM prompt form: shared on requests of 4, with collaborative tokens." in (
        out / "sample_efficiency.md").read_text()

    # Scored as the LoRA was trained: the shared form's prompts and each candidate's item vector.
    test = shared_test_subset(prepared, 100, 0)
    embeddings = np.load(data / "embeddings.npy")
    scorer = load_trained(out / row["details"]["lora"], base, "float32", k_text=3, device="cpu")
    crm = FrozenCRM.load(data / "crm", prepared, embeddings).outputs(test)
    prompts = scorer.prompts(prepared, test, embeddings, "semantic")
    probs = scorer.score(prompts, crm.user_reps, item_reps=crm.item_reps)
    labels = test["label"].to_numpy()
    assert binary_metrics(labels, probs)["auc"] == pytest.approx(row["test_auc"], abs=1e-6)
    with pytest.raises(ValueError, match="collaborative tokens need"):  # never scored blind
        scorer.score(prompts, crm.user_reps)

    refused = runner.invoke(app, ["sample-efficiency", "--data", str(data), "--out", str(root / "refused"),
                                  "--base-model", str(base), "--prompt-form", "per-target", "--request-size", "4"])
    assert refused.exit_code == 2 and "requests of several candidates train the shared prompt form" in refused.output


def test_bad_input_is_a_clear_error(world, tmp_path) -> None:
    _, data, _, _, _ = world
    for args, message in (
        (["--fractions", "0.1,2", "--no-llm"], "fraction must be in (0, 1]"),
        (["--fractions", "a,b", "--no-llm"], "--fractions takes comma-separated floats"),
        (["--llm-models", "reclora"], "--base-model is required"),
        (["--knowledge", str(tmp_path), "--no-llm"], "not a knowledge directory"),
    ):
        result = runner.invoke(app, ["sample-efficiency", "--data", str(data), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    missing = runner.invoke(app, ["sample-efficiency", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--no-llm"])
    assert missing.exit_code == 2 and "is not a prepared dataset" in missing.output
