"""The fusion.json contract: what training writes, serving reads, field for field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.model import Fusion
from service.model.fusion import FusionValidation, ScoreSource, score_source


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


VALIDATION = {"fused_auc": 0.74, "crm_auc": 0.75, "llm_auc": 0.56, "n": 500, "seed": 0}


def test_an_old_file_with_only_the_weights_loads_and_serves_fused():
    fusion = Fusion.from_json({"w_llm": 0.8, "w_crm": 0.6, "bias": -0.1})
    assert (fusion.serve, fusion.validation, fusion.uses_llm) == ("fused", None, True)


def test_serve_and_validation_round_trip():
    data = {"w_llm": 0.1, "w_crm": 1.0, "bias": 0.0, "serve": "crm", "validation": VALIDATION}
    fusion = Fusion.from_json(json.loads(json.dumps(data)))
    assert fusion.serve == "crm" and not fusion.uses_llm
    assert fusion.validation == FusionValidation(**VALIDATION)
    assert fusion.to_json() == data


@pytest.mark.parametrize("data", [
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "serve": "crm", "note": "x"},  # unknown field
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "serve": "llm"},  # not a serve mode
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "serve": True},
    {"w_llm": True, "w_crm": 1.0, "bias": 0.0},
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "validation": {**VALIDATION, "extra": 1}},
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "validation": {k: v for k, v in VALIDATION.items() if k != "n"}},
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "validation": {**VALIDATION, "fused_auc": 1.5}},
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "validation": {**VALIDATION, "n": 2.5}},
    {"w_llm": 1.0, "w_crm": 1.0, "bias": 0.0, "validation": [0.7]},
    [1.0, 1.0, 0.0],
])
def test_unknown_or_malformed_fields_are_refused(data):
    with pytest.raises(ValueError, match="fusion.json"):
        Fusion.from_json(data)


@pytest.mark.parametrize(("fusion", "has_llm", "source"), [
    (None, False, ScoreSource.CRM), (None, True, ScoreSource.LLM),
    (Fusion(1.0, 1.0, 0.0), True, ScoreSource.FUSED), (Fusion(1.0, 1.0, 0.0, serve="crm"), True, ScoreSource.CRM),
    (Fusion(1.0, 1.0, 0.0), False, ScoreSource.CRM),
])
def test_score_source_follows_the_bundle(fusion, has_llm, source):
    assert score_source(fusion, has_llm) is source


SUPPORT = {"edges": [1, 10, 50], "w_llm": [2.0, 1.0, 0.5, 0.1], "w_crm": [0.1, 0.5, 1.0, 1.2],
           "bias": [0.0, 0.1, 0.2, 0.3]}


def test_a_fusion_by_item_support_weighs_each_candidate_by_its_bucket():
    fusion = Fusion.from_json({"w_llm": 0.1, "w_crm": 1.2, "bias": 0.3, "item_support": SUPPORT})
    assert Fusion.from_json(json.loads(json.dumps(fusion.to_json()))) == fusion
    llm, crm = np.array([0.8, 0.8, 0.8, 0.8, 0.8]), np.array([0.3, 0.3, 0.3, 0.3, 0.3])
    support = np.array([0, 1, 9, 10, 500])  # buckets 0, 1, 1, 2, 3
    got = fusion(llm, crm, support)
    for i, b in enumerate([0, 1, 1, 2, 3]):
        plain = Fusion(SUPPORT["w_llm"][b], SUPPORT["w_crm"][b], SUPPORT["bias"][b])
        np.testing.assert_allclose(got[i], plain(llm[i:i + 1], crm[i:i + 1])[0], rtol=1e-12)
    with pytest.raises(ValueError, match="support is needed"):
        fusion(llm, crm)


@pytest.mark.parametrize("support", [{**SUPPORT, "edges": [1, 5, 50]}, {**SUPPORT, "w_llm": [1.0, 2.0]},
                                     {k: v for k, v in SUPPORT.items() if k != "bias"},
                                     {**SUPPORT, "bias": [0.0, 0.1, "x", 0.3]}, [1, 2]])
def test_malformed_support_weights_are_refused(support):
    with pytest.raises(ValueError, match="item_support"):
        Fusion.from_json({"w_llm": 0.1, "w_crm": 1.2, "bias": 0.3, "item_support": support})


def test_support_buckets_and_their_names():
    from service.model.fusion import support_buckets, support_labels

    assert support_buckets(np.array([0, 1, 9, 10, 49, 50, 10_000])).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert support_labels() == ("0", "1-9", "10-49", "50+")
