"""``reclora prompt-forms``: trained LoRAs of either prompt form judged on the same requests, as served.

The gateway scores a request's candidates together against the user's history at request time;
the shared form retrieves that history once for the whole candidate set. So the LoRAs are judged
on requests (``training.llm.requests.user_requests``): the seeded validation draw and test subset
(the draws ``llm-report`` and the sweep use), each user's rows in time order grouped up to
``request_size`` candidates reading the history of the request's first row. Every LoRA is scored
in its own form (per-target: each candidate's own retrieved history; shared: one for the set) and
compared with the first LoRA on the same rows: the AUC difference with DeLong's paired standard
error, LLM alone and fused with the CRM (the fusion fitted on validation; its validation AUC
cross-fitted), and fused by item support (``fit_support_fusion``); beside them what the export's
rule would serve (the better fusion on cross-fitted validation, where it beats the CRM) and its
test AUC. Tokens the engine runs per request and scoring seconds are measured in the same run.
Scores are kept under ``scores/`` (``training.llm.report.kept_scores``), so a rerun scores only
what changed. Writes ``prompt_forms.json`` and ``prompt_forms.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.samples import PreparedData
from training.llm.crm_outputs import FrozenCRM
from training.llm.fusion_fit import (ValidationScores, cross_fitted_scores, decide, fit_fusion, fit_support_fusion,
                                     validation_subset)
from training.llm.loading import load_trained
from training.llm.report import files_record, kept_scores
from training.llm.requests import request_slices, user_requests
from training.metrics import binary_metrics, paired_auc_difference
from training.slices import SampleSlices, slice_markdown, slice_table

SPLITS = ("valid", "test")
PICKS = {"crm": "CRM", "plain": "fused", "by_support": "fused by item support"}


@dataclass(frozen=True)
class FormsConfig:
    valid_samples: int = 2000
    n_test: int = 2000
    request_size: int = 20
    seed: int = 0
    dtype: str = "auto"
    k_text: int = 10
    token_budget: int = 8192


def draws(data: PreparedData, cfg: FormsConfig) -> dict[str, pd.DataFrame]:
    """The validation draw and test subset as requests."""
    test = data.split("test")
    return {"valid": user_requests(validation_subset(data, cfg.valid_samples, cfg.seed), cfg.request_size),
            "test": user_requests(test.sample(n=min(cfg.n_test, len(test)), random_state=cfg.seed), cfg.request_size)}


def run_prompt_forms(data_dir: Path, crm_dir: Path, base_dir: Path, loras: dict[str, Path], out_dir: Path,
                     cfg: FormsConfig = FormsConfig(), echo: Callable[[str], None] = print) -> dict:
    """Score every LoRA of ``loras`` (name -> trained directory; the first is the reference) on the
    same requests; returns the table written to ``out_dir``."""
    return judge_forms(PreparedData.load(data_dir), np.load(data_dir / "embeddings.npy", allow_pickle=False), crm_dir,
                       base_dir, loras, out_dir, cfg, echo)


def judge_forms(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, base_dir: Path, loras: dict[str, Path],
                out_dir: Path, cfg: FormsConfig = FormsConfig(), echo: Callable[[str], None] = print) -> dict:
    """``run_prompt_forms`` on a loaded dataset."""
    if not loras:
        raise ValueError("name at least one trained LoRA")
    rows = draws(data, cfg)
    labels = {s: rows[s]["label"].to_numpy().astype(int) for s in SPLITS}
    crm = FrozenCRM.load(crm_dir, data, embeddings)
    crm_out = {s: crm.outputs(rows[s]) for s in SPLITS}
    crm_probs = {s: crm_out[s].probabilities for s in SPLITS}
    reps = {s: crm_out[s].user_reps[[p.start for p in request_slices(rows[s])]] for s in SPLITS}
    slices = {s: SampleSlices.of(data, rows[s]) for s in SPLITS}

    scored: dict[str, dict] = {}
    for name, lora_dir in loras.items():
        scorer = load_trained(lora_dir, base_dir, cfg.dtype, cfg.k_text)
        form = scorer.builder_for(data).config.form
        requests = {s: scorer.request_prompts(data, rows[s], embeddings, "semantic") for s in SPLITS}
        tokens = {s: [len(r.prefix) + sum(map(len, r.suffixes)) for r in requests[s]] for s in SPLITS}
        record = {**asdict(cfg), "model": name, "form": form, "files": files_record([base_dir, lora_dir])}
        probs, seconds = kept_scores(out_dir / "scores", record, {s: len(rows[s]) for s in SPLITS},
                                     lambda scorer=scorer, requests=requests:
                                     {s: scorer.score_requests(requests[s], reps[s], cfg.token_budget,
                                                               crm_out[s].item_reps)
                                      for s in SPLITS})
        n_requests = sum(len(requests[s]) for s in SPLITS)
        scored[name] = {"form": form, "probs": probs, "ms_per_request": 1000 * seconds / n_requests,
                        "tokens_per_request": float(np.mean(tokens["valid"] + tokens["test"])),
                        "train": _training(lora_dir)}
        echo(f"{name} ({form}): {seconds:.0f} s for {n_requests} requests")
        del scorer

    fused = fused_scores(scored, labels, crm_probs, cfg.seed, slices)
    result = {"config": asdict(cfg), "loras": {n: str(d) for n, d in loras.items()},
              "requests": {s: int(rows[s]["request"].nunique()) for s in SPLITS},
              "rows_per_split": {s: len(rows[s]) for s in SPLITS},
              "positives": {s: int(labels[s].sum()) for s in SPLITS},
              "crm": {s: binary_metrics(labels[s], crm_probs[s])["auc"] for s in SPLITS},
              "rows": table(scored, labels, crm_probs, fused),
              "slices": test_slices(scored, labels, crm_probs, slices["test"], fused)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prompt_forms.json").write_text(json.dumps(result, indent=2))
    (out_dir / "prompt_forms.md").write_text(markdown(result))
    return result


def fused_scores(scored: dict[str, dict], labels: dict[str, np.ndarray], crm: dict[str, np.ndarray],
                 seed: int, slices: dict[str, SampleSlices]) -> dict[str, dict]:
    """Per LoRA its fusions with the CRM, plain and by item support (each row's item training
    interactions, from ``slices``): on validation cross-fitted (each fold by a fusion fitted on the
    others), on test by the fusion fitted on the whole validation draw; and what the export's rule
    (``fusion_fit.decide``) would serve, as ``serves`` ("crm", "plain" or "by_support")."""
    fused = {}
    support = {s: slices[s].item_support for s in SPLITS}
    for name, s in scored.items():
        p, y = s["probs"], labels["valid"]
        plain = fit_fusion(p["valid"], crm["valid"], y)
        by_support = fit_support_fusion(p["valid"], crm["valid"], y, support["valid"])
        decided = decide(ValidationScores(p["valid"], crm["valid"], y, seed, slices["valid"]), None, "fitted").fusion
        fused[name] = {
            "plain": {"test": plain(p["test"], crm["test"]),
                      "valid": cross_fitted_scores(p["valid"], crm["valid"], y, seed)},
            "by_support": {"test": by_support(p["test"], crm["test"], support["test"]),
                           "valid": cross_fitted_scores(p["valid"], crm["valid"], y, seed, support["valid"])},
            "serves": "crm" if decided.serve == "crm" else "plain" if decided.item_support is None else "by_support"}
    return fused


def test_slices(scored: dict[str, dict], labels: dict[str, np.ndarray], crm: dict[str, np.ndarray],
                slices: SampleSlices, fused: dict[str, dict]) -> dict[str, list[dict]]:
    """Test AUC by slice (``training.slices``): the LoRAs alone against the first LoRA alone, and
    fused (plain, then by item support) against the first LoRA's plain fusion, with paired
    standard errors; the CRM beside them (``fused``: ``fused_scores``)."""
    alone = {"CRM": crm["test"], **{name: s["probs"]["test"] for name, s in scored.items()}}
    reference = next(iter(scored))
    by_kind = {**{name: f["plain"]["test"] for name, f in fused.items()},
               **{f"{name} by support": f["by_support"]["test"] for name, f in fused.items()}}
    return {"alone": slice_table(labels["test"], alone, slices, reference=reference),
            "fused": slice_table(labels["test"], by_kind, slices, reference=reference)}


def table(scored: dict[str, dict], labels: dict[str, np.ndarray], crm: dict[str, np.ndarray],
          both: dict[str, dict]) -> list[dict]:
    """One row per LoRA: its AUCs alone and fused, each against the first LoRA's with a paired
    standard error; fused by item support; what validation picks to serve and its test AUC
    (``both``: ``fused_scores``)."""
    fused = {name: f["plain"] for name, f in both.items()}
    crm_auc = {split: binary_metrics(labels[split], crm[split])["auc"] for split in SPLITS}
    reference = next(iter(scored))
    rows = []
    for name, s in scored.items():
        row = {"lora": name, "form": s["form"], "ms_per_request": s["ms_per_request"],
               "tokens_per_request": s["tokens_per_request"], **s["train"],
               "valid_fused_auc": binary_metrics(labels["valid"], fused[name]["valid"])["auc"]}
        for split in SPLITS:
            row[f"{split}_auc"] = binary_metrics(labels[split], s["probs"][split])["auc"]
            if name != reference:
                row[f"{split}_diff"], row[f"{split}_diff_se"] = paired_auc_difference(
                    labels[split], scored[reference]["probs"][split], s["probs"][split])
        row["test_fused_auc"] = binary_metrics(labels["test"], fused[name]["test"])["auc"]
        for split in SPLITS:
            row[f"{split}_by_support_auc"] = binary_metrics(labels[split], both[name]["by_support"][split])["auc"]
        row["serves"] = pick = both[name]["serves"]
        row["test_served_auc"] = crm_auc["test"] if pick == "crm" else \
            binary_metrics(labels["test"], both[name][pick]["test"])["auc"]
        if name != reference:
            for split in SPLITS:
                row[f"{split}_fused_diff"], row[f"{split}_fused_diff_se"] = paired_auc_difference(
                    labels[split], fused[reference][split], fused[name][split])
        rows.append(row)
    return rows


def _training(lora_dir: Path) -> dict:
    train = lora_dir / "train.json"
    if not train.is_file():
        return {}
    t = json.loads(train.read_text())
    return {"train_seconds": t.get("train_seconds"), "train_instances": t.get("instances"),
            "request_size": t.get("config", {}).get("request_size", 1),
            "seconds_per_instance": t["train_seconds"] / t["instances"] if t.get("instances") else None}


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Requests: each user's rows of the seeded draws in time order, up to {cfg['request_size']} candidates a "
             f"request reading the history of its first row; validation {result['rows_per_split']['valid']} rows "
             f"({result['positives']['valid']} positive) in {result['requests']['valid']} requests, test "
             f"{result['rows_per_split']['test']} rows ({result['positives']['test']} positive) in "
             f"{result['requests']['test']} requests; seed {cfg['seed']}, dtype {cfg['dtype']}. CRM AUC: valid "
             f"{result['crm']['valid']:.4f}, test {result['crm']['test']:.4f}. Differences are against the first "
             f"row on the same rows, with DeLong's paired standard error.", "",
             "| LoRA | form | request size (training) | train s / instance | valid AUC | Δ valid ± SE "
             "| valid fused AUC (cross-fitted) | Δ valid fused ± SE | test AUC | Δ test ± SE | test fused AUC "
             "| Δ fused ± SE | valid fused by item support (cross-fitted) | test fused by item support "
             "| validation picks | its test AUC | tokens / request | scoring ms / request |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def diff(row: dict, key: str) -> str:
        return f"{row[key]:+.4f} ± {row[key + '_se']:.4f}" if key in row else "-"

    for r in result["rows"]:
        per = r.get("seconds_per_instance")
        lines.append(f"| {r['lora']} | {r['form']} | {r.get('request_size', '-')} | "
                     f"{'-' if per is None else f'{per:.3f}'} | {r['valid_auc']:.4f} | {diff(r, 'valid_diff')} | "
                     f"{r['valid_fused_auc']:.4f} | {diff(r, 'valid_fused_diff')} | {r['test_auc']:.4f} | "
                     f"{diff(r, 'test_diff')} | "
                     f"{r['test_fused_auc']:.4f} | {diff(r, 'test_fused_diff')} | {r['valid_by_support_auc']:.4f} | "
                     f"{r['test_by_support_auc']:.4f} | {PICKS[r['serves']]} | {r['test_served_auc']:.4f} | "
                     f"{r['tokens_per_request']:.0f} | "
                     f"{r['ms_per_request']:.0f} |")
    reference = result["rows"][0]["lora"] if result["rows"] else None
    for kind, title in (("alone", "alone"), ("fused", "fused with the CRM (fitted on validation; then by item "
                                                       "support)")):
        if result.get("slices", {}).get(kind):
            lines += ["", f"Test AUC by slice, the LoRAs {title}:", "",
                      slice_markdown(result["slices"][kind], reference).rstrip("\n")]
    return "\n".join(lines) + "\n"
