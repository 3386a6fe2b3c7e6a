"""``reclora prototypes``: what serving P prototype adapters instead of every user's own mixture
costs in accuracy, on one trained RecLoRA.

The prototypes are the export's (``training.export.prototypes``): the training users' gate outputs
(each user's latest training sample) clustered by seeded k-means into P centroids; a request is
scored with the centroid nearest to its user's gate outputs. Everything is scored as served: the
embedded engine (``TorchEngine``, the gateway's dtype rule) on the validation draw and the test
subset as requests (``training.studies.prompt_forms.draws``), each request with its user's gate
weights over the LoRA's banks (exact) or its prototype's centroid. Each P is compared with exact
on the same rows: the AUC difference with DeLong's paired standard error, LLM alone and fused with
the CRM (validation: cross-fitted fusions, paired per sample). The smallest P whose validation
LLM-alone AUC is within one standard error of exact is named, and only it and exact are scored on
the test subset. Scores are kept under ``scores/`` so a rerun scores only what changed. Writes
``prototypes.json`` and ``prototypes.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from service.engine.base import LoRABanks, UserMixture
from service.engine.torch_engine import TorchEngine
from service.llm.personalized_lora import AdapterMixer, PersonalizedLoRAConfig
from service.llm.prototypes import nearest_centroids
from training.data.samples import PreparedData
from training.export.prototypes import PrototypeOptions, fit_prototypes, gate_features, latest_per_user
from training.llm.crm_outputs import FrozenCRM
from training.llm.fusion_fit import cross_fitted_scores, fit_fusion
from training.llm.loading import load_base, load_trained
from training.llm.report import files_record, kept_scores
from training.llm.requests import request_slices
from training.metrics import binary_metrics, paired_auc_difference
from training.studies.prompt_forms import SPLITS, FormsConfig, draws


@dataclass(frozen=True)
class PrototypesConfig:
    """The prototype counts P, and the requests, dtype and seed as the prompt-forms study draws them."""

    counts: tuple[int, ...] = (1, 4, 16, 64, 256)
    requests: FormsConfig = FormsConfig()


def run_prototypes(data_dir: Path, crm_dir: Path, base_dir: Path, lora_dir: Path, out_dir: Path,
                   cfg: PrototypesConfig = PrototypesConfig(), echo: Callable[[str], None] = print) -> dict:
    """Score the LoRA with exact mixtures and with P prototypes for every P of ``cfg.counts``."""
    return judge_prototypes(PreparedData.load(data_dir), np.load(data_dir / "embeddings.npy", allow_pickle=False),
                            crm_dir, base_dir, lora_dir, out_dir, cfg, echo)


def judge_prototypes(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, base_dir: Path, lora_dir: Path,
                     out_dir: Path, cfg: PrototypesConfig = PrototypesConfig(),
                     echo: Callable[[str], None] = print) -> dict:
    """``run_prototypes`` on a loaded dataset."""
    forms = cfg.requests
    rows = draws(data, forms)
    labels = {s: rows[s]["label"].to_numpy().astype(int) for s in SPLITS}
    crm = FrozenCRM.load(crm_dir, data, embeddings)
    crm_out = {s: crm.outputs(rows[s]) for s in SPLITS}
    crm_probs = {s: crm_out[s].probabilities for s in SPLITS}
    slices = {s: request_slices(rows[s]) for s in SPLITS}

    lora_cfg = PersonalizedLoRAConfig.model_validate_json((lora_dir / "config.json").read_text())
    mixer = AdapterMixer(lora_cfg, load_file(lora_dir / "weights.safetensors"))
    alphas = {s: mixer.gate_outputs(crm_out[s].user_reps[[p.start for p in slices[s]]]) for s in SPLITS}
    train_users = latest_per_user(data.split("train"))
    features = gate_features(mixer, crm.outputs(train_users).user_reps)

    scorer = load_trained(lora_dir, base_dir, forms.dtype, forms.k_text)
    requests = {s: scorer.request_prompts(data, rows[s], embeddings, "semantic") for s in SPLITS}
    builder = scorer.builder_for(data)
    del scorer
    model, _ = load_base(base_dir, forms.dtype, "cpu")
    engine = TorchEngine(model, yes_id=builder.yes_id, no_id=builder.no_id, target_modules=lora_cfg.target_modules)
    banks = LoRABanks.of(lora_dir.name, mixer)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def score(name: str, chosen: dict[str, torch.Tensor], splits: Sequence[str]) -> dict[str, np.ndarray]:
        """Per split, every row's P(Yes) with its request's gate weights from ``chosen``."""
        record = {**asdict(forms), "model": name, "dtype": dtype, "splits": list(splits),
                  "files": files_record([base_dir, lora_dir])}

        def run() -> dict[str, np.ndarray]:
            out = {}
            for s in splits:
                probs = np.empty(len(rows[s]))
                for request, part, weights in zip(requests[s], slices[s], chosen[s]):
                    probs[part] = engine.score(UserMixture(f"{name}:{part.start}", banks, weights),
                                               request.prefix, request.suffixes)
                out[s] = probs
            return out

        probs, seconds = kept_scores(out_dir / "scores", record, {s: len(rows[s]) for s in splits}, run)
        echo(f"{name}: {seconds:.0f} s")
        return probs

    exact = score("exact", alphas, SPLITS)
    prototypes = {}  # per P and split, each request's prototype's gate weights
    for count in cfg.counts:
        centroids = torch.from_numpy(fit_prototypes(features, PrototypeOptions(count, forms.seed)).centroids)
        prototypes[count] = {s: centroids[nearest_centroids(alphas[s], centroids)].reshape(alphas[s].shape)
                             for s in SPLITS}

    valid = {count: score(f"P={count}", prototypes[count], ["valid"])["valid"] for count in cfg.counts}
    rows_out = [valid_row("exact", exact["valid"], exact["valid"], labels["valid"], crm_probs["valid"], forms.seed)]
    rows_out += [valid_row(f"P={count}", valid[count], exact["valid"], labels["valid"], crm_probs["valid"], forms.seed)
                 for count in cfg.counts]
    chosen = next((count for count, row in zip(cfg.counts, rows_out[1:])
                   if row["valid_diff"] >= -row["valid_diff_se"]), None)
    test = None
    if chosen is not None:
        p_test = score(f"P={chosen} test", prototypes[chosen], ["test"])["test"]
        test = test_row(chosen, {"valid": valid[chosen], "test": p_test}, exact, labels, crm_probs)
    result = {"config": asdict(cfg), "lora": str(lora_dir), "dtype": dtype,
              "requests": {s: len(slices[s]) for s in SPLITS}, "rows_per_split": {s: len(rows[s]) for s in SPLITS},
              "training_users": len(features),
              "crm": {s: binary_metrics(labels[s], crm_probs[s])["auc"] for s in SPLITS},
              "valid": rows_out, "smallest_within_one_se": chosen, "test": test}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prototypes.json").write_text(json.dumps(result, indent=2))
    (out_dir / "prototypes.md").write_text(markdown(result))
    return result


def valid_row(name: str, probs: np.ndarray, exact: np.ndarray, labels: np.ndarray, crm: np.ndarray,
              seed: int) -> dict:
    """Validation AUCs of one configuration, alone and fused (cross-fitted), each against exact."""
    fused, fused_exact = cross_fitted_scores(probs, crm, labels, seed), cross_fitted_scores(exact, crm, labels, seed)
    row = {"config": name, "valid_auc": binary_metrics(labels, probs)["auc"],
           "valid_fused_auc": binary_metrics(labels, fused)["auc"]}
    if probs is not exact:
        row["valid_diff"], row["valid_diff_se"] = paired_auc_difference(labels, exact, probs)
        row["valid_fused_diff"], row["valid_fused_diff_se"] = paired_auc_difference(labels, fused_exact, fused)
    return row


def test_row(count: int, probs: dict[str, np.ndarray], exact: dict[str, np.ndarray], labels: dict[str, np.ndarray],
             crm: dict[str, np.ndarray]) -> dict:
    """The test subset, once: P prototypes against exact, alone and fused (each fusion fitted on its
    own validation scores)."""
    y = labels["test"]
    fused = {name: fit_fusion(p["valid"], crm["valid"], labels["valid"])(p["test"], crm["test"])
             for name, p in (("exact", exact), ("prototypes", probs))}
    row = {"count": count, "exact_auc": binary_metrics(y, exact["test"])["auc"],
           "auc": binary_metrics(y, probs["test"])["auc"],
           "exact_fused_auc": binary_metrics(y, fused["exact"])["auc"],
           "fused_auc": binary_metrics(y, fused["prototypes"])["auc"]}
    row["diff"], row["diff_se"] = paired_auc_difference(y, exact["test"], probs["test"])
    row["fused_diff"], row["fused_diff_se"] = paired_auc_difference(y, fused["exact"], fused["prototypes"])
    return row


def markdown(result: dict) -> str:
    lines = [f"Validation: {result['rows_per_split']['valid']} samples in {result['requests']['valid']} requests "
             f"(CRM AUC {result['crm']['valid']:.4f}); prototypes from {result['training_users']} training users; "
             f"the embedded engine in {result['dtype']}.", "",
             "| adapters | valid AUC | vs exact | fused (cross-fitted) | vs exact |", "|---|---|---|---|---|"]
    for row in result["valid"]:
        versus = ("—", "—") if row["config"] == "exact" else (
            f"{row['valid_diff']:+.4f} ± {row['valid_diff_se']:.4f}",
            f"{row['valid_fused_diff']:+.4f} ± {row['valid_fused_diff_se']:.4f}")
        lines.append(f"| {row['config']} | {row['valid_auc']:.4f} | {versus[0]} | {row['valid_fused_auc']:.4f} | "
                     f"{versus[1]} |")
    chosen = result["smallest_within_one_se"]
    lines += ["", f"Smallest P within one standard error of exact (LLM alone): {chosen if chosen else 'none'}."]
    test = result["test"]
    if test is not None:
        lines.append(f"Test subset ({result['rows_per_split']['test']} samples, once): LLM alone exact "
                     f"{test['exact_auc']:.4f}, P={test['count']} {test['auc']:.4f} ({test['diff']:+.4f} ± "
                     f"{test['diff_se']:.4f}); fused exact {test['exact_fused_auc']:.4f}, P={test['count']} "
                     f"{test['fused_auc']:.4f} ({test['fused_diff']:+.4f} ± {test['fused_diff_se']:.4f}).")
    return "\n".join(lines) + "\n"
