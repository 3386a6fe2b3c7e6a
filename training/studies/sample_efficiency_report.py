"""The sample-efficiency study's outputs: the runs as JSON, a table per model and share, one figure.

Means and standard deviations are over seeds (sample std, n - 1; 0 for a single seed). The
findings answer Laser's CRM claim in words: does the CRM with knowledge on at most 10% of the
training data reach the full-data CRM, and what does knowledge add at 100% and at 10%.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from training.studies.sample_efficiency import MODELS

JSON_FILE, MARKDOWN_FILE, FIGURE_FILE = "sample_efficiency.json", "sample_efficiency.md", "sample_efficiency.png"
SMALL_SHARE = 0.1  # "at most 10% of the data"
_EPS = 1e-9


def mean_std(values: list[float]) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (model, training samples), in the order of ``MODELS`` then size."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["n_train_samples"])].append(row)
    order = list(MODELS)
    out = []
    for (model, n), group in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        auc, auc_std = mean_std([r["test_auc"] for r in group])
        loss, loss_std = mean_std([r["test_logloss"] for r in group])
        entry = {"model": model, "label": MODELS[model], "n_train_samples": n, "fraction": group[0]["fraction"],
                 "n_seeds": len(group), "seeds": sorted(r["seed"] for r in group), "test_auc_mean": auc,
                 "test_auc_std": auc_std, "test_logloss_mean": loss, "test_logloss_std": loss_std,
                 "valid_auc_mean": mean_std([r["valid_auc"] for r in group])[0],
                 "wall_seconds_mean": mean_std([r["wall_seconds"] for r in group])[0]}
        if all("test_slices" in r for r in group):
            entry["test_slices"] = {key: _slice_mean([r["test_slices"][key] for r in group])
                                    for key in group[0]["test_slices"]}
        if all("test_full_auc" in r for r in group):
            entry["test_full_auc_mean"], entry["test_full_auc_std"] = mean_std([r["test_full_auc"] for r in group])
        out.append(entry)
    return out


def _slice_mean(entries: list[dict]) -> dict:
    """A slice's AUC averaged over seeds (None where any seed's slice had too few of a label)."""
    aucs = [e["auc"] for e in entries]
    mean = None if any(a is None for a in aucs) else mean_std(aucs)[0]
    return {"n": entries[0]["n"], "positives": entries[0]["positives"], "auc": mean}


def slice_markdown_rows(groups: list[dict]) -> list[str]:
    """The test subset's AUC per slice for every model and share (mean over seeds)."""
    with_slices = [g for g in groups if "test_slices" in g]
    if not with_slices:
        return []
    keys = list(with_slices[0]["test_slices"])
    counts = with_slices[0]["test_slices"]
    head = ["model", "train share", *(f"{k} (n={counts[k]['n']})" for k in keys)]
    lines = ["Test AUC by slice (mean over seeds; item and user support count training interactions; - where "
             "a slice has fewer than two of a label):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in with_slices:
        cells = [g["label"], _pct(g["fraction"])]
        cells += ["-" if g["test_slices"][k]["auc"] is None else f"{g['test_slices'][k]['auc']:.4f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _full_data(groups: list[dict], model: str) -> dict | None:
    return next((g for g in groups if g["model"] == model and g["fraction"] >= 1.0 - _EPS), None)


def knowledge_gain(rows: list[dict], fraction: float) -> dict | None:
    """CRM + knowledge minus CRM test AUC at ``fraction``, paired by seed (same subset)."""
    def by_seed(model: str) -> dict[int, float]:
        return {r["seed"]: r["test_auc"] for r in rows if r["model"] == model and abs(r["fraction"] - fraction) < _EPS}

    plain, knowing = by_seed("crm"), by_seed("crm_knowledge")
    seeds = sorted(plain.keys() & knowing.keys())
    if not seeds:
        return None
    mean, std = mean_std([knowing[s] - plain[s] for s in seeds])
    return {"fraction": fraction, "mean": mean, "std": std, "n_seeds": len(seeds)}


def findings(rows: list[dict], groups: list[dict]) -> dict:
    """The answers to the study's questions, as numbers (``findings_text`` words them)."""
    full = _full_data(groups, "crm")
    out: dict = {"full_data_crm_auc": None if full is None else full["test_auc_mean"],
                 "knowledge_runs": any(r["model"] == "crm_knowledge" for r in rows)}
    if full is not None and out["knowledge_runs"]:
        small = [g for g in groups if g["model"] == "crm_knowledge" and g["fraction"] <= SMALL_SHARE + _EPS]
        reached = [g for g in small if g["test_auc_mean"] >= full["test_auc_mean"]]
        out["knowledge_reaches_full_crm"] = bool(reached) if small else None
        best = min(reached, key=lambda g: g["fraction"]) if reached else max(small, key=lambda g: g["test_auc_mean"],
                                                                              default=None)
        out["knowledge_small_share"] = None if best is None else {
            k: best[k] for k in ("fraction", "n_train_samples", "test_auc_mean", "test_auc_std", "n_seeds")}
    out["knowledge_gain"] = {f"{share:g}": knowledge_gain(rows, share) for share in (1.0, SMALL_SHARE)}
    return out


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def findings_text(found: dict) -> list[str]:
    if not found["knowledge_runs"]:
        return ["No CRM + knowledge runs: pass --knowledge to answer whether knowledge makes the CRM sample-efficient."]
    if found["full_data_crm_auc"] is None:
        return ["No full-data CRM run (add 1 to --fractions): nothing to compare the CRM + knowledge with."]
    full = found["full_data_crm_auc"]
    small = found.get("knowledge_small_share")
    if small is None:
        lines = [f"No CRM + knowledge run at {_pct(SMALL_SHARE)} of the data or less (see --fractions)."]
    else:
        verdict = "reaches" if found["knowledge_reaches_full_crm"] else "does not reach"
        where = "first at" if found["knowledge_reaches_full_crm"] else "best at"
        lines = [f"**The CRM with knowledge on at most {_pct(SMALL_SHARE)} of the training data {verdict} the "
                 f"full-data CRM** (test AUC {full:.4f}): {where} {_pct(small['fraction'])} "
                 f"({small['n_train_samples']} samples), AUC {small['test_auc_mean']:.4f} ± "
                 f"{small['test_auc_std']:.4f} over {small['n_seeds']} seed(s)."]
    for share, gain in found["knowledge_gain"].items():
        if gain is None:
            lines.append(f"Knowledge gain at {_pct(float(share))}: no paired CRM and CRM + knowledge runs.")
        else:
            lines.append(f"Knowledge gain at {_pct(gain['fraction'])} (test AUC, CRM + knowledge - CRM, paired by "
                         f"seed): {gain['mean']:+.4f} ± {gain['std']:.4f} over {gain['n_seeds']} seed(s).")
    return lines


def _llm_prompt(protocol: dict) -> str:
    """The LLM runs' prompt form, where the protocol records it (older studies: per-target)."""
    form = protocol.get("llm_prompt_form")
    if form is None:
        return ""
    grouped = f" on requests of {protocol['llm_request_size']}" if protocol.get("llm_request_size", 1) > 1 else ""
    collab = ", with collaborative tokens" if protocol.get("llm_collab_tokens") else ""
    return f" LLM prompt form: {form.replace('_', '-')}{grouped}{collab}."


def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = [f"Test subset: {p['n_test']} of {p['n_test_full']} test samples (seed {p['test_seed']}), the one "
             "`reclora llm-report` scores; every model selected on validation. Training subsets: seeded shares of "
             f"the {p['n_train_total']} training samples, nested per seed (validation and test untouched). "
             "Mean ± std over seeds. Full test AUC: the whole test split (CRM side only). Valid AUC: the whole "
             f"validation split, for the LLM the {p['llm_valid_samples']} validation samples its checkpoint is "
             f"selected on.{_llm_prompt(p)}", "",
             "| model | train share | train samples | test AUC | test LogLoss | full test AUC | valid AUC | seeds "
             "| wall time per run (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for g in result["groups"]:
        full = f"{g['test_full_auc_mean']:.4f} ± {g['test_full_auc_std']:.4f}" if "test_full_auc_mean" in g else "-"
        lines.append(f"| {g['label']} | {_pct(g['fraction'])} | {g['n_train_samples']} | {g['test_auc_mean']:.4f} ± "
                     f"{g['test_auc_std']:.4f} | {g['test_logloss_mean']:.4f} ± {g['test_logloss_std']:.4f} | {full} | "
                     f"{g['valid_auc_mean']:.4f} | {g['n_seeds']} | {g['wall_seconds_mean']:.1f} |")
    slices = slice_markdown_rows(result["groups"])
    if slices:
        lines += ["", *slices]
    lines += ["", *(f"{line}\n" for line in findings_text(result["findings"]))]
    return "\n".join(lines).rstrip() + "\n"


def efficiency_plot(groups: list[dict], path: Path) -> None:
    """Test AUC against training samples (log x), one line per model, std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for model in MODELS:
        line = [g for g in groups if g["model"] == model]
        if line:
            ax.errorbar([g["n_train_samples"] for g in line], [g["test_auc_mean"] for g in line],
                        yerr=[g["test_auc_std"] for g in line], marker="o", capsize=3, label=MODELS[model])
    full = _full_data(groups, "crm")
    if full is not None:
        ax.axhline(full["test_auc_mean"], color="k", linestyle="--", linewidth=0.8,
                   label=f"full-data CRM (AUC {full['test_auc_mean']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("training samples")
    ax.set_ylabel("test AUC")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], protocol: dict, out_dir: Path, figure: bool = True) -> dict:
    """Write the JSON (every run; its settings stay in ``runs/``), the Markdown table and (with
    ``figure``) the figure; returns the JSON's content."""
    groups = aggregate(rows)
    result = {"protocol": protocol, "rows": [{k: v for k, v in r.items() if k != "settings"} for r in rows],
              "groups": groups, "findings": findings(rows, groups)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_FILE).write_text(json.dumps(result, indent=2))
    (out_dir / MARKDOWN_FILE).write_text(markdown(result))
    if figure:
        efficiency_plot(groups, out_dir / FIGURE_FILE)
    return result
