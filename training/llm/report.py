"""The LLM report: CRM, zero-shot LLM, ReLLa-style, RecLoRA and fused, on one seeded test subset.

Fusion is a logistic regression on (LLM logit, CRM logit) fitted on a validation subset, so
nothing is tuned on test; its fusion.json says whether a bundle should serve it or the CRM alone
(``training.llm.fusion_fit.decide``). Writes report.md, report.json, fusion.json and roc.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from service.model.fusion import FUSION_FILE
from training.data.samples import PreparedData
from training.llm.fusion_fit import (ValidationScores, crm_probabilities, decide, fit_fusion,  # noqa: F401
                                     validation_subset)
from training.llm.train import LLMScorer, load_base, load_trained, user_representations
from training.metrics import binary_metrics


def run_report(data_dir: Path, crm_dir: Path, base_dir: Path, rella_dir: Path | None, reclora_dir: Path | None,
               out_dir: Path, *, n_test: int = 2000, n_valid: int = 1000, seed: int = 0, k_text: int = 10,
               dtype: str = "float32", batch_size: int = 16) -> dict:
    data = PreparedData.load(data_dir)
    embeddings = np.load(data_dir / "embeddings.npy", allow_pickle=False)
    test = data.split("test").sample(n=min(n_test, len(data.split("test"))), random_state=seed)
    valid = validation_subset(data, n_valid, seed)
    labels = {"test": test["label"].to_numpy(), "valid": valid["label"].to_numpy()}
    probs: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    probs["CRM"] = {s: crm_probabilities(data, df, crm_dir, embeddings) for s, df in (("test", test), ("valid", valid))}
    seconds["CRM"] = time.perf_counter() - start

    reps = {"test": user_representations(data, test, crm_dir, embeddings),
            "valid": user_representations(data, valid, crm_dir, embeddings)}
    model, tokenizer = load_base(base_dir, dtype)
    scorers: dict[str, LLMScorer] = {"zero-shot LLM": LLMScorer(model, tokenizer, None, k_text)}
    if rella_dir is not None:
        scorers["ReLLa-style (shared LoRA)"] = load_trained(rella_dir, base_dir, dtype, k_text)
    if reclora_dir is not None:
        scorers["RecLoRA (personalized LoRA)"] = load_trained(reclora_dir, base_dir, dtype, k_text)
    prompts = {s: scorers["zero-shot LLM"].prompts(data, df, embeddings, "semantic") for s, df in (("test", test), ("valid", valid))}
    for name, scorer in scorers.items():
        start = time.perf_counter()
        probs[name] = {s: scorer.score(prompts[s], reps[s], batch_size) for s in ("test", "valid")}
        seconds[name] = time.perf_counter() - start
    fused_from = "RecLoRA (personalized LoRA)" if reclora_dir is not None else next(reversed(scorers))
    decision = decide(ValidationScores(probs[fused_from]["valid"], probs["CRM"]["valid"], labels["valid"], seed),
                      None, "fitted")
    fusion = decision.fusion
    probs[f"fused ({fused_from.split(' (')[0]} + CRM)"] = {
        s: fusion(probs[fused_from][s], probs["CRM"][s]) for s in ("test", "valid")}

    rows = [{"model": name, **binary_metrics(labels["test"], p["test"]), "valid_auc": binary_metrics(labels["valid"], p["valid"])["auc"],
             "seconds": seconds.get(name, 0.0)} for name, p in probs.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"n_test": len(test), "n_valid": len(valid), "seed": seed, "k_text": k_text, "rows": rows,
              "fusion": fusion.to_json(), "fusion_decision": decision.summary(), "fused_from": fused_from}
    for name, d in (("ReLLa-style (shared LoRA)", rella_dir), ("RecLoRA (personalized LoRA)", reclora_dir)):
        if d is not None and (d / "train.json").is_file():
            t = json.loads((d / "train.json").read_text())
            result.setdefault("training", {})[name] = {k: t[k] for k in ("train_seconds", "instances", "best_valid_auc")}
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    (out_dir / FUSION_FILE).write_text(json.dumps(fusion.to_json(), indent=2))
    (out_dir / "report.md").write_text(markdown(result))
    roc_plot({n: (labels["test"], p["test"]) for n, p in probs.items()}, out_dir / "roc.png")
    return result


def markdown(result: dict) -> str:
    lines = [f"Test subset: {result['n_test']} samples (seed {result['seed']}); fusion fitted on "
             f"{result['n_valid']} validation samples; K_text = {result['k_text']}.", "",
             "| model | AUC | LogLoss | ACC | valid AUC | scoring time (s) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['acc']:.4f} | {r['valid_auc']:.4f} | {r['seconds']:.1f} |")
    d = result.get("fusion_decision")
    if d:
        lines += ["", f"Serve: {d['serve']} (valid AUC fused {d['fused_auc']:.4f}, {d['fused_auc_method']}, "
                      f"against CRM {d['crm_auc']:.4f})."]
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
