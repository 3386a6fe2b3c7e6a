"""The fusion a bundle serves, decided at export: fused when it ranks validation better than the CRM.

A trained LoRA and the CRM score one seeded validation subset (the same draw as ``llm-report``'s:
``validation_subset``); the fusion is the report's, else the one the fused training objective
wrote beside the LoRA, else a logistic regression fitted here. A fitted fusion is judged by its
cross-fitted AUC (each fold scored by a fusion fitted on the other folds), so an LLM that adds
only noise cannot look useful by fitting that noise; a given fusion is judged as it is. When the
fused AUC does not beat the CRM's, the bundle says ``serve: crm`` and the gateway never runs the
LLM for it: the engine's time buys nothing there.

A second fitted candidate weighs by item support (each item-support bucket its own weights,
``service.model.fusion.SupportWeights``): it is judged by the same cross-fitting and served only
where it beats both the CRM and the plain fusion. The decision records both, and AUC per slice
(``training.slices``) of the CRM, the LLM and the fusions on the same validation samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from service.model.fusion import (FUSION_FILE, ITEM_SUPPORT_EDGES, Fusion, FusionValidation, ScoreSource,
                                  SupportWeights, logit, support_buckets)
from training.data.samples import PreparedData
from training.metrics import binary_metrics
from training.slices import SampleSlices, slice_table

DEFAULT_SAMPLES = 500
FOLDS = 5
Serve = Literal["auto", "fused", "crm"]
FusionSource = Literal["report", "objective", "fitted"]


@dataclass(frozen=True)
class FusionOptions:
    """How the export measures and decides the fusion.

    ``serve``: ``auto`` decides by validation AUC; ``fused`` or ``crm`` force the decision (the
    figures are still measured and recorded), e.g. to canary a fusion validation does not favour.
    ``dtype``: the LoRA's scoring precision (``auto``: bfloat16 where the CPU computes it natively,
    as the serving engine does, else float32; the label logits are float32 either way)."""

    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    dtype: str = "auto"
    batch_size: int = 16
    serve: Serve = "auto"

    def __post_init__(self) -> None:
        if self.samples < 2 * FOLDS:
            raise ValueError(f"the fusion needs at least {2 * FOLDS} validation samples, got {self.samples}")
        if self.serve not in ("auto", "fused", "crm"):
            raise ValueError(f"serve must be auto, fused or crm, got {self.serve!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"the fusion's dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class ValidationScores:
    """P(like) of the LLM and the CRM on one validation subset, with its labels."""

    llm: np.ndarray
    crm: np.ndarray
    labels: np.ndarray
    seed: int
    slices: SampleSlices | None = None  # the same samples' slices (None: no fusion by support, no slice table)


@dataclass(frozen=True)
class FusionDecision:
    """The fusion to write (``serve`` and ``validation`` set) and how it was reached."""

    fusion: Fusion
    source: FusionSource
    forced: bool
    fused_auc_in_sample: float  # the written weights on the whole subset (equals fused_auc for a given fusion)
    seconds: float = 0.0
    dtype: str = ""
    by_support_auc: float | None = None  # the fusion by item support, cross-fitted (None: not fitted)
    slices: list[dict] | None = None  # training.slices.slice_table of the validation samples

    def summary(self) -> dict:
        """The manifest's record of the decision (``metrics.fusion``)."""
        v = self.fusion.validation
        assert v is not None
        return {"serve": self.fusion.serve, "source": self.source, "forced": self.forced,
                "fused_auc": v.fused_auc, "crm_auc": v.crm_auc, "llm_auc": v.llm_auc,
                "fused_auc_in_sample": self.fused_auc_in_sample, "n": v.n, "seed": v.seed,
                "fused_auc_method": f"{FOLDS}-fold cross-fitted" if self.source == "fitted" else "as given",
                "weights": {"w_llm": self.fusion.w_llm, "w_crm": self.fusion.w_crm, "bias": self.fusion.bias},
                "by_item_support": self.fusion.item_support is not None, "by_support_auc": self.by_support_auc,
                "dtype": self.dtype, "seconds": round(self.seconds, 1),
                **({"slices": self.slices} if self.slices is not None else {})}


def describe(summary: dict) -> str:
    """One line for the operator from ``FusionDecision.summary()``: what the bundle serves and why."""
    how = "forced" if summary["forced"] else (
        "fused beats the CRM" if summary["serve"] == "fused" else "fused does not beat the CRM: the LLM is not run")
    kind = "fused by item support" if summary.get("by_item_support") else "fused"
    support = (f", fused by item support {summary['by_support_auc']:.4f}"
               if summary.get("by_support_auc") is not None and not summary.get("by_item_support") else "")
    return (f"serve {summary['serve']} ({how}): valid AUC {kind} {summary['fused_auc']:.4f}{support} "
            f"({summary['fused_auc_method']}), CRM {summary['crm_auc']:.4f}, LLM {summary['llm_auc']:.4f} on "
            f"{summary['n']} samples (seed {summary['seed']}); fusion {summary['source']}, LoRA scored in "
            f"{summary['dtype']} in {summary['seconds']:.0f} s")


def fit_fusion(p_llm: np.ndarray, p_crm: np.ndarray, labels: np.ndarray) -> Fusion:
    """The serving fusion fitted on validation: a logistic regression on the two logits."""
    lr = LogisticRegression(C=10.0).fit(np.stack([logit(p_llm), logit(p_crm)], 1), labels)
    return Fusion(float(lr.coef_[0, 0]), float(lr.coef_[0, 1]), float(lr.intercept_[0]))


def fit_support_fusion(p_llm: np.ndarray, p_crm: np.ndarray, labels: np.ndarray,
                       item_support: np.ndarray) -> Fusion:
    """A fusion with weights per item-support bucket: one logistic regression on the two logits
    and, per bucket other than the best-supported, its own offsets of the intercept and both
    weights; the L2 penalty draws a bucket with few samples towards the shared weights (a bucket
    absent from validation takes them unchanged). The base weights are the best-supported bucket's."""
    l_llm, l_crm = logit(p_llm), logit(p_crm)
    buckets = support_buckets(item_support)
    n_buckets, ref = len(ITEM_SUPPORT_EDGES) + 1, len(ITEM_SUPPORT_EDGES)
    others = [b for b in range(n_buckets) if b != ref]
    columns = [l_llm, l_crm]
    for b in others:
        on = (buckets == b).astype(np.float64)
        columns += [on, on * l_llm, on * l_crm]
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(np.stack(columns, 1), labels)
    coef, b0 = lr.coef_[0], float(lr.intercept_[0])
    w_llm, w_crm, bias = [float(coef[0])] * n_buckets, [float(coef[1])] * n_buckets, [b0] * n_buckets
    for i, b in enumerate(others):
        bias[b] += float(coef[2 + 3 * i])
        w_llm[b] += float(coef[3 + 3 * i])
        w_crm[b] += float(coef[4 + 3 * i])
    return Fusion(float(coef[0]), float(coef[1]), b0, item_support=SupportWeights(tuple(w_llm), tuple(w_crm),
                                                                                    tuple(bias)))


def validation_subset(data: PreparedData, n: int, seed: int) -> pd.DataFrame:
    """The seeded validation draw every LLM evaluation uses (``llm-report``, export, sweep): the
    first ``n`` of one seeded permutation, so a smaller draw is a prefix of a larger one."""
    valid = data.split("valid")
    return valid.sample(n=min(n, len(valid)), random_state=seed)


def cross_fitted_auc(p_llm: np.ndarray, p_crm: np.ndarray, labels: np.ndarray, seed: int,
                     item_support: np.ndarray | None = None) -> float:
    """AUC of fusions scored on folds they were not fitted on (by item support where it is given)."""
    scores = cross_fitted_scores(p_llm, p_crm, labels, seed, item_support)
    return binary_metrics(np.asarray(labels).astype(int), scores)["auc"]


def cross_fitted_scores(p_llm: np.ndarray, p_crm: np.ndarray, labels: np.ndarray, seed: int,
                        item_support: np.ndarray | None = None) -> np.ndarray:
    """Every sample's fused score from a fusion fitted on the other folds (paired comparisons of
    two LLMs' fusions read these); with ``item_support``, fusions weighing by it."""
    y = np.asarray(labels).astype(int)
    folds = StratifiedKFold(n_splits=min(FOLDS, int(np.bincount(y, minlength=2).min())), shuffle=True,
                            random_state=seed)
    out = np.empty(len(y))
    for fit_rows, score_rows in folds.split(np.zeros(len(y)), y):
        if item_support is None:
            fold_fusion = fit_fusion(p_llm[fit_rows], p_crm[fit_rows], y[fit_rows])
            out[score_rows] = fold_fusion(p_llm[score_rows], p_crm[score_rows])
        else:
            fold_fusion = fit_support_fusion(p_llm[fit_rows], p_crm[fit_rows], y[fit_rows], item_support[fit_rows])
            out[score_rows] = fold_fusion(p_llm[score_rows], p_crm[score_rows], item_support[score_rows])
    return out


def decide(scores: ValidationScores, given: Fusion | None, source: FusionSource,
           serve: Serve = "auto") -> FusionDecision:
    """The fusion to serve and the decision, from validation scores (``given``: the report's or the
    objective's fusion; None fits one)."""
    y = np.asarray(scores.labels).astype(int)
    if len(y) < 2 * FOLDS or np.bincount(y, minlength=2).min() < 2:
        raise ValueError(f"the validation subset ({len(y)} samples, {int(y.sum())} positive) needs at least "
                         f"{2 * FOLDS} samples and two of each label to measure the fusion")
    crm_auc = binary_metrics(y, scores.crm)["auc"]
    llm_auc = binary_metrics(y, scores.llm)["auc"]
    support = None if scores.slices is None else scores.slices.item_support
    if given is None:
        fusion = fit_fusion(scores.llm, scores.crm, y)
        fused = cross_fitted_scores(scores.llm, scores.crm, y, scores.seed)
    else:
        fusion = given
        fused = fusion(scores.llm, scores.crm, support)
    fused_auc = binary_metrics(y, fused)["auc"]
    by_support_auc = by_support = None
    if given is None and support is not None:
        by_support = cross_fitted_scores(scores.llm, scores.crm, y, scores.seed, support)
        by_support_auc = binary_metrics(y, by_support)["auc"]
        if by_support_auc > fused_auc:  # served only where it beats the plain fusion (and, below, the CRM)
            fusion, fused_auc = fit_support_fusion(scores.llm, scores.crm, y, support), by_support_auc
    in_sample = binary_metrics(y, fusion(scores.llm, scores.crm, support))["auc"]
    chosen = serve if serve != "auto" else (ScoreSource.FUSED.value if fused_auc > crm_auc else ScoreSource.CRM.value)
    validation = FusionValidation(fused_auc=fused_auc, crm_auc=crm_auc, llm_auc=llm_auc, n=len(y), seed=scores.seed)
    decided = replace(fusion, serve=chosen, validation=validation)
    slices = None
    if scores.slices is not None:
        by_model = {"CRM": scores.crm, "LLM": scores.llm, "fused": fused}
        if by_support is not None:
            by_model["fused by item support"] = by_support
        slices = slice_table(y, by_model, scores.slices, reference="CRM")
    return FusionDecision(decided, "fitted" if given is None else source, serve != "auto", in_sample,
                          by_support_auc=by_support_auc, slices=slices)


def given_fusion(llm_dir: Path, report_dir: Path | None) -> tuple[Fusion | None, FusionSource]:
    """The report's fusion.json, else the one the fused training objective wrote beside the LoRA."""
    for directory, source in ((report_dir, "report"), (llm_dir, "objective")):
        if directory is not None and (directory / FUSION_FILE).is_file():
            path = directory / FUSION_FILE
            try:
                return Fusion.from_json(json.loads(path.read_text())), source  # type: ignore[return-value]
            except (ValueError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: {exc}") from None
    return None, "fitted"


def score_validation(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, llm_dir: Path, base_dir: Path,
                     options: FusionOptions, k_text: int) -> ValidationScores:
    """The LoRA's and the CRM's P(like) on the seeded validation subset."""
    from training.llm.crm_outputs import FrozenCRM
    from training.llm.loading import load_trained

    valid = validation_subset(data, options.samples, options.seed)
    crm = FrozenCRM.load(crm_dir, data, embeddings).outputs(valid)
    scorer = load_trained(llm_dir, base_dir, options.dtype, k_text)
    llm = scorer.score(scorer.prompts(data, valid, embeddings, "semantic"), crm.user_reps, options.batch_size,
                       crm.item_reps)
    slices = SampleSlices.of(data, valid)
    return ValidationScores(np.asarray(llm, np.float64), np.asarray(crm.probabilities, np.float64),
                            valid["label"].to_numpy().astype(int), options.seed, slices)


def fusion_at_export(data: PreparedData, embeddings: np.ndarray, crm_dir: Path, llm_dir: Path, base_dir: Path,
                     report_dir: Path | None, k_text: int, options: FusionOptions) -> FusionDecision:
    """Measure on validation and decide what the bundle serves (see the module docstring)."""
    from service.llm.precision import resolve_dtype
    from training.llm.loading import resolve_device

    start = time.perf_counter()
    given, source = given_fusion(llm_dir, report_dir)
    scores = score_validation(data, embeddings, crm_dir, llm_dir, base_dir, options, k_text)
    decision = decide(scores, given, source, options.serve)
    dtype = str(resolve_dtype(options.dtype, resolve_device())).removeprefix("torch.")
    return replace(decision, seconds=time.perf_counter() - start, dtype=dtype)
