import numpy as np
import pytest
import torch

from service.crm.features import FeatureSpace
from service.crm.inputs import build_inputs, search_behaviours
from service.crm.loading import build_crm, config_for

N_ITEMS = 30


@pytest.fixture()
def space() -> FeatureSpace:
    return FeatureSpace(n_items=N_ITEMS, user_fields={"gender": ["F", "M"]}, genres=["a", "b"], year_edges=[1990],
                        rating_levels=[1, 2, 3, 4, 5], rating_min=1, rating_max=5, label_threshold=3)


@pytest.fixture()
def embeddings() -> torch.Tensor:
    x = torch.randn(N_ITEMS + 1, 8, generator=torch.Generator().manual_seed(0))
    x = x / x.norm(dim=1, keepdim=True)
    x[0] = 0
    return x


def test_search_picks_most_similar_in_time_order(embeddings: torch.Tensor) -> None:
    hist = torch.tensor([[0, 0, 5, 9, 2, 17, 11, 4]])
    targets = torch.tensor([3, 8])
    pos, sim = search_behaviours(hist, targets, embeddings, k=3)
    for row, t in enumerate(targets):
        valid = hist[0] != 0
        scores = torch.where(valid, embeddings[hist[0]] @ embeddings[t], torch.tensor(-np.inf))
        expected = scores.topk(3).indices.sort().values
        assert pos[row].tolist() == expected.tolist()
        assert (pos[row].diff() > 0).all()
    # a per-target copy of the history gives the same picks as the shared one
    pos2, _ = search_behaviours(hist.expand(2, -1).contiguous(), targets, embeddings, k=3)
    assert torch.equal(pos, pos2)


def test_short_history_pads_and_cold_start_works(space: FeatureSpace, embeddings: torch.Tensor) -> None:
    user, target = build_inputs(
        space, user_fields=np.array([[1]]), hist_items=np.array([[0, 0, 7, 8]]),
        hist_ratings=np.array([[np.nan, np.nan, 5.0, 1.0]], np.float32), hist_lengths=np.array([2]),
        targets=np.array([1, 2, 3]), item_embeddings=embeddings, l_long=10, l_crm=3, l_recent=3)
    assert target.sel_items.shape == (3, 3)
    assert ((target.sel_items == 0).sum(1) == 1).all()  # two behaviours exist, third slot is padding
    assert torch.allclose(user.hist_stats[0, :2], torch.tensor([0.5, 0.5]))  # mean 3 -> 0.5; one of two positive
    cold_user, cold_target = build_inputs(
        space, user_fields=np.array([[0]]), hist_items=np.zeros((1, 0), np.int64),
        hist_ratings=np.zeros((1, 0), np.float32), hist_lengths=np.array([0]), targets=np.array([4, 5]),
        item_embeddings=embeddings, l_long=10, l_crm=3, l_recent=3)
    assert (cold_target.sel_items == 0).all() and (cold_user.recent_items == 0).all()


def test_user_representation_is_target_independent(space: FeatureSpace, embeddings: torch.Tensor) -> None:
    import pandas as pd

    catalog = pd.DataFrame({"item_idx": range(1, N_ITEMS + 1), "genres": ["a|b"] * N_ITEMS, "year": [1995] * N_ITEMS})
    model = build_crm(config_for(space, 8, l_crm=4, l_recent=4), space, catalog, embeddings.numpy()).eval()
    hist = np.array([[3, 4, 5, 6, 7, 8]])
    ratings = np.array([[5, 4, 1, 2, 5, 3]], np.float32)
    reps, logits = [], []
    for targets in (np.array([1, 2]), np.array([9, 10, 11])):
        user, target = build_inputs(space, user_fields=np.array([[2]]), hist_items=hist, hist_ratings=ratings,
                                    hist_lengths=np.array([6]), targets=targets, item_embeddings=embeddings,
                                    l_long=100, l_crm=4, l_recent=4)
        with torch.no_grad():
            logit, rep = model(user, target)
        reps.append(rep)
        logits.append(logit)
    assert reps[0].shape == (1, model.config.user_dim)
    assert torch.equal(reps[0], reps[1])
    assert logits[0].shape == (2,) and logits[1].shape == (3,)
    assert torch.isfinite(logits[1]).all()
