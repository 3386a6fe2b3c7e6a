"""Request-shaped samples: a user's candidates reading one history, for training and evaluation."""

import pandas as pd
import pytest

from training.data.samples import prepare
from training.data.synthetic import generate_synthetic
from training.llm.requests import anchored_requests, request_slices, user_requests


@pytest.fixture(scope="module")
def data():
    return prepare(generate_synthetic(n_users=40, n_items=60, n_interactions=1500, seed=2))


def check_requests(rows: pd.DataFrame, source: pd.DataFrame, size: int) -> None:
    """Every request: one user, at most ``size`` rows in time order, each row's own target and
    label, all reading the history of the request's first row (which is that row's own)."""
    assert rows["request"].is_monotonic_increasing
    for part in request_slices(rows):
        request = rows.iloc[part]
        assert 1 <= len(request) <= size and request["user_idx"].nunique() == 1
        own = source.loc[request.index]
        assert own["hist_end"].is_monotonic_increasing
        assert (request["hist_end"] == own["hist_end"].iloc[0]).all()
        assert (request["hist_len"] == own["hist_len"].iloc[0]).all()
        assert request[["item_idx", "label"]].equals(own[["item_idx", "label"]])


def test_anchored_requests_hold_n_rows_of_a_users_next_samples(data) -> None:
    train = data.split("train")
    rows = anchored_requests(train, 200, 6, seed=0)
    assert len(rows) == 200
    check_requests(rows, train, 6)
    for part in request_slices(rows):  # the anchor, then the user's very next rows of the split
        request = rows.iloc[part]
        mine = train[train["user_idx"] == request["user_idx"].iloc[0]].sort_values("hist_end")
        first = mine.index.get_loc(request.index[0])
        assert list(mine.index[first : first + len(request)]) == list(request.index)
    assert anchored_requests(train, 200, 6, seed=0).equals(rows)
    assert not anchored_requests(train, 200, 6, seed=1).equals(rows)
    single = anchored_requests(train, 50, 1, seed=0)
    assert single["request"].tolist() == list(range(50))
    assert (single[["hist_end", "hist_len"]] == train.loc[single.index, ["hist_end", "hist_len"]]).all().all()


def test_user_requests_group_the_draw_itself(data) -> None:
    valid = data.split("valid").sample(n=120, random_state=0)
    rows = user_requests(valid, 5)
    assert sorted(rows.index) == sorted(valid.index)  # the same rows and labels, regrouped
    check_requests(rows, valid, 5)
    counts = rows.groupby("user_idx")["request"].nunique()
    sizes = valid.groupby("user_idx").size()
    assert (counts == -(-sizes // 5)).all()  # as few requests as the size allows


@pytest.mark.parametrize("size", [0, -1])
def test_a_request_holds_at_least_one_row(data, size: int) -> None:
    with pytest.raises(ValueError):
        anchored_requests(data.split("train"), 10, size, seed=0)
    with pytest.raises(ValueError):
        user_requests(data.split("valid"), size)
