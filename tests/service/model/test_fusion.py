"""The fusion.json contract: what training writes, serving reads, field for field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.model import Fusion


def test_round_trip_through_json():
    fusion = Fusion(w_llm=0.8, w_crm=0.6, bias=-0.1)
    assert Fusion.from_json(json.loads(json.dumps(fusion.to_json()))) == fusion


def test_scores_are_the_logistic_of_weighted_logits():
    fusion = Fusion(w_llm=1.0, w_crm=2.0, bias=0.5)
    llm, crm = np.array([0.5, 0.9]), np.array([0.5, 0.2])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    expected = 1 / (1 + np.exp(-(logit(llm) + 2.0 * logit(crm) + 0.5)))
    np.testing.assert_allclose(fusion(llm, crm), expected, rtol=1e-9)
    assert np.isfinite(fusion(np.array([0.0, 1.0]), np.array([1.0, 0.0]))).all()  # saturated inputs stay finite


@pytest.mark.parametrize("data", [{"w_llm": 1.0, "w_crm": 1.0}, {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "extra": 1},
                                  {"w_llm": "x", "w_crm": 1.0, "bias": 0.0}])
def test_malformed_fusion_files_are_refused(data):
    with pytest.raises(ValueError):
        Fusion.from_json(data)
