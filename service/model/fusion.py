"""The fusion of LLM and CRM scores: the ``fusion.json`` contract between training and serving.

Fitted offline (``training.llm.fusion_fit``, at export) as a logistic regression on the two
logits, measured on a seeded validation subset against the CRM alone, written into the bundle,
and applied to every request that has LLM scores. ``serve`` is the export's decision: ``crm``
when the fused score ranked validation no better than the CRM's, so the version never spends
the engine on its LLM. Defined once here so both sides read and write the same fields.
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
class Fusion:
    """score = sigmoid(w_llm * logit(llm) + w_crm * logit(crm) + bias), fitted offline on valid.

    ``serve`` says whether the version serves that score (``fused``) or the CRM's alone (``crm``);
    files written before it existed hold only the weights and serve ``fused``."""

    w_llm: float
    w_crm: float
    bias: float
    serve: str = ScoreSource.FUSED.value
    validation: FusionValidation | None = None

    def __post_init__(self) -> None:
        if self.serve not in SERVE_MODES:
            raise ValueError(f"{FUSION_FILE}: serve must be one of {list(SERVE_MODES)}, got {self.serve!r}")

    @property
    def uses_llm(self) -> bool:
        """Whether requests of this version need LLM scores at all."""
        return self.serve == ScoreSource.FUSED.value

    def __call__(self, llm: np.ndarray, crm: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.w_llm * logit(llm) + self.w_crm * logit(crm) + self.bias)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Fusion":
        """The fields of ``fusion.json``: exactly the weights, plus optionally ``serve`` and
        ``validation``; a missing, unknown or malformed field is refused (ValueError)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{FUSION_FILE} must be a JSON object, got {type(data).__name__}")
        required, optional = {"w_llm", "w_crm", "bias"}, {"serve", "validation"}
        if not required <= set(data) or not set(data) <= required | optional:
            raise ValueError(f"{FUSION_FILE} must hold exactly {sorted(required)} and optionally {sorted(optional)}, "
                             f"got {sorted(data)}")
        weights = {k: _number(data[k], k) for k in sorted(required)}
        validation = FusionValidation.from_json(data["validation"]) if data.get("validation") is not None else None
        return cls(**weights, serve=data.get("serve", ScoreSource.FUSED.value), validation=validation)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"w_llm": self.w_llm, "w_crm": self.w_crm, "bias": self.bias, "serve": self.serve}
        if self.validation is not None:
            out["validation"] = dataclasses.asdict(self.validation)
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
