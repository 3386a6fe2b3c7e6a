"""The LLM report: CRM, zero-shot LLM, ReLLa-style, RecLoRA and fused, on one seeded test subset.

Fusion is a logistic regression on (LLM logit, CRM logit) fitted on a validation subset, so
nothing is tuned on test; its fusion.json says whether a bundle should serve it or the CRM alone
(``training.llm.fusion_fit.decide``). A trained model is scored in the prompt form and words it
was trained with (its ``train.json``), the zero-shot LLM in the dataset's per-target form. Writes
report.md, report.json, fusion.json and roc.png.

Scoring an LLM model takes tens of minutes on a CPU, so each model's scores are kept under
``scores/`` as they finish (NPY, with a JSON record of what produced them: subset, dtype, batch
size and the model directories' files): a rerun reads back what still matches and scores only the
rest. Trained models are scored before the zero-shot one, so an interrupted run keeps the most.

Under torchrun every rank runs the report and scores its share of each model's samples
(``LLMScorer``'s ranks), the scores gathered in order on every rank; rank 0 alone writes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from service.model.fusion import FUSION_FILE
from training.data.samples import PreparedData
from training.distributed import Ranks
from training.llm.crm_outputs import FrozenCRM
from training.llm.fusion_fit import ValidationScores, decide, fit_fusion, validation_subset  # noqa: F401
from training.llm.loading import load_base, load_trained
from training.llm.offline_scoring import LLMScorer
from training.metrics import binary_metrics
from training.slices import SampleSlices, llm_beats_reference, slice_markdown, slice_table

SCORES_DIR = "scores"
SPLITS = ("test", "valid")


def run_report(data_dir: Path, crm_dir: Path, base_dir: Path, rella_dir: Path | None, reclora_dir: Path | None,
               out_dir: Path, *, n_test: int = 2000, n_valid: int = 1000, seed: int = 0, k_text: int = 10,
               dtype: str = "float32", batch_size: int = 16, ranks: Ranks | None = None) -> dict:
    ranks = ranks or Ranks()
    data = PreparedData.load(data_dir)
    embeddings = np.load(data_dir / "embeddings.npy", allow_pickle=False)
    test = data.split("test").sample(n=min(n_test, len(data.split("test"))), random_state=seed)
    valid = validation_subset(data, n_valid, seed)
    labels = {"test": test["label"].to_numpy(), "valid": valid["label"].to_numpy()}
    probs: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    crm = FrozenCRM.load(crm_dir, data, embeddings)
    crm_outputs = {"test": crm.outputs(test), "valid": crm.outputs(valid)}
    probs["CRM"] = {s: out.probabilities for s, out in crm_outputs.items()}
    seconds["CRM"] = time.perf_counter() - start

    reps = {s: out.user_reps for s, out in crm_outputs.items()}
    items = {s: out.item_reps for s, out in crm_outputs.items()}  # what collaborative tokens read
    model, tokenizer = load_base(base_dir, dtype)
    scorers: dict[str, LLMScorer] = {"zero-shot LLM": LLMScorer(model, tokenizer, None, k_text)}
    if rella_dir is not None:
        scorers["ReLLa-style (shared LoRA)"] = load_trained(rella_dir, base_dir, dtype, k_text)
    if reclora_dir is not None:
        scorers["RecLoRA (personalized LoRA)"] = load_trained(reclora_dir, base_dir, dtype, k_text)
    for scorer in scorers.values():
        scorer.ranks = ranks
    # Each model is scored in the form (and words) it was trained with; models of one prompt version share prompts.
    by_version: dict[str, dict[str, list[list[int]]]] = {}
    for scorer in scorers.values():
        version = scorer.builder_for(data).config.version
        if version not in by_version:
            by_version[version] = {s: scorer.prompts(data, df, embeddings, "semantic")
                                   for s, df in (("test", test), ("valid", valid))}
    sources = {"zero-shot LLM": [base_dir], "ReLLa-style (shared LoRA)": [base_dir, rella_dir],
               "RecLoRA (personalized LoRA)": [base_dir, reclora_dir]}
    common = {"n_test": len(test), "n_valid": len(valid), "seed": seed, "k_text": k_text, "dtype": dtype,
              "batch_size": batch_size}
    for name in sorted(scorers, key=lambda n: n == "zero-shot LLM"):  # trained models first
        scorer, record = scorers[name], {**common, "model": name, "files": files_record(sources[name])}
        prompts = by_version[scorer.builder.config.version]
        sizes = {s: len(prompts[s]) for s in SPLITS}
        probs[name], seconds[name] = kept_scores(
            out_dir / SCORES_DIR, record, sizes,
            lambda scorer=scorer, prompts=prompts: {s: scorer.score(prompts[s], reps[s], batch_size, items[s])
                                                    for s in SPLITS},
            ranks)
    probs = {"CRM": probs["CRM"], **{name: probs[name] for name in scorers}}  # the table's order
    fused_from = "RecLoRA (personalized LoRA)" if reclora_dir is not None else next(reversed(scorers))
    slices = {"test": SampleSlices.of(data, test), "valid": SampleSlices.of(data, valid)}
    decision = decide(ValidationScores(probs[fused_from]["valid"], probs["CRM"]["valid"], labels["valid"], seed,
                                       slices["valid"]), None, "fitted")
    fusion = decision.fusion
    probs[f"fused ({fused_from.split(' (')[0]} + CRM)"] = {
        s: fusion(probs[fused_from][s], probs["CRM"][s], slices[s].item_support) for s in ("test", "valid")}

    rows = [{"model": name, **binary_metrics(labels["test"], p["test"]), "valid_auc": binary_metrics(labels["valid"], p["valid"])["auc"],
             "seconds": seconds.get(name, 0.0)} for name, p in probs.items()]
    test_slices = slice_table(labels["test"], {name: p["test"] for name, p in probs.items()}, slices["test"],
                              reference="CRM")
    result = {"n_test": len(test), "n_valid": len(valid), "seed": seed, "k_text": k_text, "rows": rows,
              "fusion": fusion.to_json(), "fusion_decision": decision.summary(), "fused_from": fused_from,
              "slices": test_slices,
              "beats_crm": {name: llm_beats_reference(test_slices, name) for name in probs if name != "CRM"}}
    for name, d in (("ReLLa-style (shared LoRA)", rella_dir), ("RecLoRA (personalized LoRA)", reclora_dir)):
        if d is not None and (d / "train.json").is_file():
            t = json.loads((d / "train.json").read_text())
            result.setdefault("training", {})[name] = {k: t[k] for k in ("train_seconds", "instances", "best_valid_auc")}
    if not ranks.is_main:
        ranks.barrier()
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    (out_dir / FUSION_FILE).write_text(json.dumps(fusion.to_json(), indent=2))
    (out_dir / "report.md").write_text(markdown(result))
    roc_plot({n: (labels["test"], p["test"]) for n, p in probs.items()}, out_dir / "roc.png")
    ranks.barrier()
    return result


def files_record(dirs: list[Path]) -> list[list]:
    """(path, size, mtime) of every file directly in ``dirs``: retraining into a directory, or
    replacing the base model, changes it and so invalidates that model's kept scores."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
            for d in dirs for f in sorted(Path(d).iterdir()) if f.is_file()]


def kept_scores(cache: Path, record: dict, sizes: dict[str, int], score,
                ranks: Ranks | None = None) -> tuple[dict[str, np.ndarray], float]:
    """A model's (scores per split, scoring seconds): read back from ``cache`` when its record
    matches ``record`` exactly, else ``score()``d now and kept (by rank 0; the ranks of a
    distributed report read back only where all of them can, so all of them score alike)."""
    ranks = ranks or Ranks()
    kept = _read_kept(cache, record, sizes)
    if not ranks.any(kept is None):
        return kept
    start = time.perf_counter()
    scores = {s: np.asarray(v, np.float64) for s, v in score().items()}
    seconds = time.perf_counter() - start
    if ranks.is_main:
        _keep(cache, record, scores, seconds)
    return scores, seconds


def _read_kept(cache: Path, record: dict, sizes: dict[str, int]) -> tuple[dict[str, np.ndarray], float] | None:
    """The kept (scores, seconds) of ``record``, else None."""
    slug = re.sub(r"[^a-z0-9]+", "-", record["model"].lower()).strip("-")
    meta, arrays = cache / f"{slug}.json", {s: cache / f"{slug}.{s}.npy" for s in sizes}
    if meta.is_file() and all(a.is_file() for a in arrays.values()):
        kept = json.loads(meta.read_text())
        if kept.get("record") == json.loads(json.dumps(record)):
            scores = {s: np.load(a, allow_pickle=False) for s, a in arrays.items()}
            if all(len(scores[s]) == n for s, n in sizes.items()):
                return scores, float(kept["seconds"])
    return None


def _keep(cache: Path, record: dict, scores: dict[str, np.ndarray], seconds: float) -> None:
    slug = re.sub(r"[^a-z0-9]+", "-", record["model"].lower()).strip("-")
    meta, arrays = cache / f"{slug}.json", {s: cache / f"{slug}.{s}.npy" for s in scores}
    cache.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)  # no record may vouch for arrays being replaced
    for s, a in arrays.items():
        np.save(a, scores[s], allow_pickle=False)
    meta.write_text(json.dumps({"record": record, "seconds": seconds}, indent=2))  # last: marks it complete


def markdown(result: dict) -> str:
    lines = [f"Test subset: {result['n_test']} samples (seed {result['seed']}); fusion fitted on "
             f"{result['n_valid']} validation samples; K_text = {result['k_text']}.", "",
             "| model | AUC | LogLoss | ACC | valid AUC | scoring time (s) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['acc']:.4f} | {r['valid_auc']:.4f} | {r['seconds']:.1f} |")
    d = result.get("fusion_decision")
    if d:
        kind = "fused by item support" if d.get("by_item_support") else "fused"
        lines += ["", f"Serve: {d['serve']} (valid AUC {kind} {d['fused_auc']:.4f}, {d['fused_auc_method']}, "
                      f"against CRM {d['crm_auc']:.4f})."]
    if result.get("slices"):
        lines += ["", "## Test subset by slice", "", slice_markdown(result["slices"], "CRM").rstrip()]
        beats = {name: where for name, where in result.get("beats_crm", {}).items() if where}
        lines += ["", "Slices where a model beats the CRM by more than one paired standard error: "
                  + ("; ".join(f"{name}: {', '.join(where)}" for name, where in beats.items()) if beats else "none")
                  + "."]
    return "\n".join(lines) + "\n"


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
