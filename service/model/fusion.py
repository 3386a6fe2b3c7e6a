"""The fusion of LLM and CRM scores: the ``fusion.json`` contract between training and serving.

Fitted offline (``training.llm.fusion_fit``, at export) as a logistic regression on the two
logits, measured on a seeded validation subset against the CRM alone, written into the bundle,
and applied to every request that has LLM scores. ``serve`` is the export's decision: ``crm``
when the fused score ranked validation no better than the CRM's, so the version never spends
the engine on its LLM. Defined once here so both sides read and write the same fields.

A fusion may weigh by the candidate's item support (its interactions in the training data, in the
buckets ``ITEM_SUPPORT_EDGES`` draws): an LLM that reads item texts can help most where the CRM has
seen an item least, so each bucket has its own weights (``item_support``), fitted with the plain
fusion's as a shared base and applied with the support the bundle's catalog records per item.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

FUSION_FILE = "fusion.json"
ITEM_SUPPORT_EDGES = (1, 10, 50)  # an item's training interactions: 0, 1-9, 10-49, 50+


def support_buckets(counts: np.ndarray, edges: tuple[int, ...] = ITEM_SUPPORT_EDGES) -> np.ndarray:
    """Each count's bucket: 0 below ``edges[0]``, i where ``edges[i-1] <= count < edges[i]``."""
    return np.searchsorted(np.asarray(edges), np.asarray(counts), side="right")


def support_labels(edges: tuple[int, ...] = ITEM_SUPPORT_EDGES) -> tuple[str, ...]:
    """The buckets' names: "0", "1-9", "10-49", "50+" for the default edges."""
    first = "0" if edges[0] == 1 else f"<{edges[0]}"
    return (first, *(f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])), f"{edges[-1]}+")


class ScoreSource(StrEnum):
    """How a version makes a request's final score (the ``score_source`` clients see)."""

    FUSED = "fused"  # the fusion of the LLM's and the CRM's scores
    LLM = "llm"  # the LLM's P(Yes) as it is: a bundle with an LLM and no fusion.json
    CRM = "crm"  # the CRM's alone: no LLM in the bundle, or its fusion says ``serve: crm``


SERVE_MODES = (ScoreSource.FUSED.value, ScoreSource.CRM.value)


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1 so saturated scores stay finite."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class FusionValidation:
    """What the ``serve`` decision was based on: AUCs on ``n`` validation samples drawn with ``seed``."""

    fused_auc: float
    crm_auc: float
    llm_auc: float
    n: int
    seed: int

    @classmethod
    def from_json(cls, data: Any) -> "FusionValidation":
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) != fields:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"{FUSION_FILE}: validation must hold exactly {sorted(fields)}, got {got}")
        aucs = {k: _number(data[k], f"validation.{k}") for k in ("fused_auc", "crm_auc", "llm_auc")}
        for key, value in aucs.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{FUSION_FILE}: validation.{key} must lie in [0, 1], got {value}")
        n, seed = data["n"], data["seed"]
        if type(n) is not int or n < 1 or type(seed) is not int:
            raise ValueError(f"{FUSION_FILE}: validation.n must be a positive integer and validation.seed an "
                             f"integer, got {n!r} and {seed!r}")
        return cls(n=n, seed=seed, **aucs)


@dataclass(frozen=True)
class SupportWeights:
    """A fusion's weights per item-support bucket (``ITEM_SUPPORT_EDGES``'s buckets, in order)."""

    w_llm: tuple[float, ...]
    w_crm: tuple[float, ...]
    bias: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(ITEM_SUPPORT_EDGES) + 1
        if not len(self.w_llm) == len(self.w_crm) == len(self.bias) == n:
            raise ValueError(f"{FUSION_FILE}: item_support needs {n} weights per field, one per bucket "
                             f"{list(support_labels())}")

    @classmethod
    def from_json(cls, data: Any) -> "SupportWeights":
        fields = {"edges", "w_llm", "w_crm", "bias"}
        if not isinstance(data, Mapping) or set(data) != fields:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"{FUSION_FILE}: item_support must hold exactly {sorted(fields)}, got {got}")
        if data["edges"] != list(ITEM_SUPPORT_EDGES):
            raise ValueError(f"{FUSION_FILE}: item_support.edges must be {list(ITEM_SUPPORT_EDGES)}, "
                             f"got {data['edges']!r}")
        weights = {}
        for key in ("w_llm", "w_crm", "bias"):
            if not isinstance(data[key], list):
                raise ValueError(f"{FUSION_FILE}: item_support.{key} must be a list, got {data[key]!r}")
            weights[key] = tuple(_number(v, f"item_support.{key}") for v in data[key])
        return cls(**weights)

    def to_json(self) -> dict[str, Any]:
        return {"edges": list(ITEM_SUPPORT_EDGES), "w_llm": list(self.w_llm), "w_crm": list(self.w_crm),
                "bias": list(self.bias)}


@dataclass(frozen=True)
class Fusion:
    """score = sigmoid(w_llm * logit(llm) + w_crm * logit(crm) + bias), fitted offline on valid;
    with ``item_support``, each candidate weighed by its item-support bucket's weights instead.

    ``serve`` says whether the version serves that score (``fused``) or the CRM's alone (``crm``);
    files written before it existed hold only the weights and serve ``fused``."""

    w_llm: float
    w_crm: float
    bias: float
    serve: str = ScoreSource.FUSED.value
    validation: FusionValidation | None = None
    item_support: SupportWeights | None = None

    def __post_init__(self) -> None:
        if self.serve not in SERVE_MODES:
            raise ValueError(f"{FUSION_FILE}: serve must be one of {list(SERVE_MODES)}, got {self.serve!r}")

    @property
    def uses_llm(self) -> bool:
        """Whether requests of this version need LLM scores at all."""
        return self.serve == ScoreSource.FUSED.value

    def __call__(self, llm: np.ndarray, crm: np.ndarray, item_support: np.ndarray | None = None) -> np.ndarray:
        """Fused P(like); ``item_support`` (each candidate's training interactions) is required by,
        and only read by, a fusion weighing by it."""
        w_llm, w_crm, bias = self.w_llm, self.w_crm, self.bias
        if self.item_support is not None:
            if item_support is None:
                raise ValueError("this fusion weighs by item support: each candidate's support is needed")
            b = support_buckets(item_support)
            w_llm, w_crm, bias = (np.asarray(v)[b] for v in
                                  (self.item_support.w_llm, self.item_support.w_crm, self.item_support.bias))
        return 1.0 / (1.0 + np.exp(-(w_llm * logit(llm) + w_crm * logit(crm) + bias)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Fusion":
        """The fields of ``fusion.json``: exactly the weights, plus optionally ``serve`` and
        ``validation``; a missing, unknown or malformed field is refused (ValueError)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{FUSION_FILE} must be a JSON object, got {type(data).__name__}")
        required, optional = {"w_llm", "w_crm", "bias"}, {"serve", "validation", "item_support"}
        if not required <= set(data) or not set(data) <= required | optional:
            raise ValueError(f"{FUSION_FILE} must hold exactly {sorted(required)} and optionally {sorted(optional)}, "
                             f"got {sorted(data)}")
        weights = {k: _number(data[k], k) for k in sorted(required)}
        validation = FusionValidation.from_json(data["validation"]) if data.get("validation") is not None else None
        support = SupportWeights.from_json(data["item_support"]) if data.get("item_support") is not None else None
        return cls(**weights, serve=data.get("serve", ScoreSource.FUSED.value), validation=validation,
                   item_support=support)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"w_llm": self.w_llm, "w_crm": self.w_crm, "bias": self.bias, "serve": self.serve}
        if self.validation is not None:
            out["validation"] = dataclasses.asdict(self.validation)
        if self.item_support is not None:
            out["item_support"] = self.item_support.to_json()
        return out


def score_source(fusion: Fusion | None, has_llm: bool) -> ScoreSource:
    """How a version with (or without) an LLM and this fusion makes its final score."""
    if not has_llm or (fusion is not None and not fusion.uses_llm):
        return ScoreSource.CRM
    return ScoreSource.LLM if fusion is None else ScoreSource.FUSED


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{FUSION_FILE}: {name} must be a finite number, got {value!r}")
    return float(value)
