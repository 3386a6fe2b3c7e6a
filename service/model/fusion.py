"""The fusion of LLM and CRM scores: the ``fusion.json`` contract between training and serving.

Fitted offline (``training.llm.report``) as a logistic regression on the two logits, written
into the bundle, and applied to every request that has LLM scores. Defined once here so both
sides read and write the same fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FUSION_FILE = "fusion.json"


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1 so saturated scores stay finite."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Fusion:
    """score = sigmoid(w_llm * logit(llm) + w_crm * logit(crm) + bias), fitted offline on valid."""

    w_llm: float
    w_crm: float
    bias: float

    def __call__(self, llm: np.ndarray, crm: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.w_llm * logit(llm) + self.w_crm * logit(crm) + self.bias)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Fusion":
        """The fields of ``fusion.json``; a missing or extra field is refused (ValueError)."""
        fields = {"w_llm", "w_crm", "bias"}
        if set(data) != fields:
            raise ValueError(f"{FUSION_FILE} must hold exactly {sorted(fields)}, got {sorted(data)}")
        return cls(**{k: float(data[k]) for k in fields})

    def to_json(self) -> dict[str, float]:
        return asdict(self)
