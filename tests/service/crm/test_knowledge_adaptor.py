"""The knowledge adaptor and the knowledge CRM; a plain CRM's checkpoint from before knowledge
existed (``fixtures/plain_crm``: weights, config and the scores it gave then) still loads and
scores the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from service.crm.features import FeatureSpace
from service.crm.inputs import build_inputs
from service.crm.knowledge import ITEM, USER, HybridExpertAdaptor
from service.crm.loading import build_crm, config_for
from service.crm.model import CRM, CRMConfig

FIXTURE = Path(__file__).parent / "fixtures" / "plain_crm"
N = 30
D = 12


def space() -> FeatureSpace:
    return FeatureSpace(n_items=N, user_fields={"gender": ["F", "M"]}, genres=["a", "b", "c"], year_edges=[1990, 2000],
                        rating_levels=[1, 2, 3, 4, 5], rating_min=1, rating_max=5, label_threshold=3)


def catalog_and_embeddings() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(N + 1, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0
    catalog = pd.DataFrame({"item_idx": range(1, N + 1), "genres": [["a", "b|c", "c", "a|b"][i % 4] for i in range(N)],
                            "year": [1980 + i for i in range(N)]})
    return catalog, emb


def request(emb: np.ndarray, config: CRMConfig, user_knowledge: np.ndarray | None = None, targets=(1, 2, 6, 12, 30)):
    hist = np.array([[0, 0, 3, 9, 4, 17, 11, 5, 21, 8]])
    ratings = np.where(hist > 0, (hist % 5) + 1, np.nan).astype(np.float32)
    return build_inputs(space(), user_fields=np.array([[2]]), hist_items=hist, hist_ratings=ratings,
                        hist_lengths=np.array([8]), targets=np.array(targets), item_embeddings=torch.from_numpy(emb),
                        l_long=100, l_crm=config.l_crm, l_recent=config.l_recent, user_knowledge=user_knowledge)


def knowledge_crm(**overrides) -> tuple[CRM, np.ndarray, np.ndarray]:
    catalog, emb = catalog_and_embeddings()
    rng = np.random.default_rng(1)
    items = rng.normal(size=(N + 1, D)).astype(np.float32)
    items[0] = 0
    default = rng.normal(size=D).astype(np.float32)
    torch.manual_seed(0)
    config = config_for(space(), 8, emb_dim=8, user_dim=16, attn_hidden=8, mlp_hidden=[16, 8], l_crm=5, l_recent=5,
                        knowledge_dim=D, knowledge_hidden=16, knowledge_out=4, **overrides)
    return build_crm(config, space(), catalog, emb, knowledge=(items, default)).eval(), emb, default


def test_plain_checkpoint_from_before_knowledge_loads_and_scores_the_same() -> None:
    config = CRMConfig.model_validate_json((FIXTURE / "config.json").read_text())
    assert "knowledge_dim" not in json.loads((FIXTURE / "config.json").read_text()) and config.knowledge_dim == 0
    catalog, emb = catalog_and_embeddings()
    weights = load_file(FIXTURE / "weights.safetensors")
    model = build_crm(config, FeatureSpace.model_validate_json((FIXTURE / "features.json").read_text()), catalog, emb,
                      weights).eval()
    assert set(model.state_dict()) == set(weights)  # no new parameter or buffer in a plain CRM
    expected = json.loads((FIXTURE / "expected.json").read_text())
    with torch.no_grad():
        logits, rep = model(*request(emb, config))
        # a plain CRM ignores knowledge vectors it is handed
        ignored, _ = model(*request(emb, config, user_knowledge=np.ones((1, D), np.float32)))
    # The fixture was scored by the code before knowledge existed; the tolerance only absorbs other
    # CPUs' kernels (on the machine that wrote it the scores are bit-identical).
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(rep[0], torch.tensor(expected["user_rep"]), rtol=0, atol=1e-6)
    assert torch.equal(ignored, logits)
    assert not any("knowledge" in name for name, _ in model.named_modules())


def test_adaptor_shapes_and_gates_are_softmax() -> None:
    torch.manual_seed(0)
    adaptor = HybridExpertAdaptor(D, n_shared=2, n_per_type=3, hidden=16, out=4, dropout=0.0)
    x = torch.randn(7, D)
    for kind in (ITEM, USER):
        gate = adaptor.gate(kind, x)
        assert gate.shape == (7, 5)
        torch.testing.assert_close(gate.sum(1), torch.ones(7))
        assert (gate > 0).all()
        assert adaptor(kind, x).shape == (7, 4)
    assert not torch.equal(adaptor(ITEM, x), adaptor(USER, x))  # own experts and gates per type
    # the output is the gate-weighted sum of the shared and the type's own experts
    experts = torch.cat([adaptor.shared(x), adaptor.own[USER](x)], 1)
    torch.testing.assert_close(adaptor(USER, x), (adaptor.gate(USER, x).unsqueeze(-1) * experts).sum(1))
    only_shared = HybridExpertAdaptor(D, n_shared=2, n_per_type=0, hidden=16, out=4, dropout=0.0)
    assert only_shared(USER, x).shape == (7, 4) and only_shared.gate(USER, x).shape == (7, 2)
    with pytest.raises(ValueError, match="at least one expert"):
        HybridExpertAdaptor(D, n_shared=0, n_per_type=0, hidden=16, out=4, dropout=0.0)


def test_knowledge_reaches_items_and_users() -> None:
    model, emb, default = knowledge_crm()
    config = model.config
    user_vec = np.random.default_rng(2).normal(size=(1, D)).astype(np.float32)
    with torch.no_grad():
        with_vec, rep_vec = model(*request(emb, config, user_vec))
        other, rep_other = model(*request(emb, config, -user_vec))
        table = model.item_table()
        model.item_knowledge_vectors[5] += 1.0  # item 5 is in the history; item 6 a target
        model.item_knowledge_vectors[6] += 1.0
        moved = model.item_table()
    assert not torch.allclose(with_vec, other) and not torch.allclose(rep_vec, rep_other)
    assert torch.equal(table[0], torch.zeros_like(table[0]))  # padding stays zero
    changed = (moved != table).any(1).nonzero().flatten().tolist()
    assert changed == [5, 6]


def test_missing_user_vector_reads_the_default() -> None:
    model, emb, default = knowledge_crm()
    config = model.config
    with torch.no_grad():
        explicit, rep_explicit = model(*request(emb, config, default[None]))
        for missing in (None, np.zeros((1, D), np.float32), np.full((1, D), np.nan, np.float32)):
            logits, rep = model(*request(emb, config, missing))
            assert torch.equal(logits, explicit) and torch.equal(rep, rep_explicit)
    user, _ = request(emb, config, np.zeros((1, D + 1), np.float32))
    with pytest.raises(ValueError, match=r"user knowledge is \(1, 13\), this CRM reads \(1, 12\)"):
        model.user_representation(user)
    with pytest.raises(ValueError, match="2 rows for 1 users"):
        request(emb, config, np.zeros((2, D), np.float32))


def test_knowledge_is_installed_with_its_shapes_checked() -> None:
    model, _, _ = knowledge_crm()
    with pytest.raises(ValueError, match=r"it needs \(31, 12\) and \(12,\)"):
        model.set_item_knowledge(torch.zeros(30, D), torch.zeros(D))
    with pytest.raises(ValueError, match=r"it needs \(31, 12\) and \(12,\)"):
        model.set_item_knowledge(torch.zeros(31, D), torch.zeros(D + 1))
    catalog, emb = catalog_and_embeddings()
    plain = build_crm(config_for(space(), 8), space(), catalog, emb)
    with pytest.raises(ValueError, match="reads no knowledge"):
        plain.set_item_knowledge(torch.zeros(31, D), torch.zeros(D))
    # the knowledge arrays are not weights: a knowledge CRM's state dict has the adaptor, not the vectors
    names = set(model.state_dict())
    assert any(n.startswith("knowledge.") for n in names)
    assert "item_knowledge_vectors" not in names and "user_knowledge_default" not in names
