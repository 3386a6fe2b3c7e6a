from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data.loaders import load_dataset
from training.data.synthetic import generate_synthetic


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    ranks = pd.Series(scores).rank().to_numpy()
    pos = labels.sum()
    neg = labels.size - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def test_shapes_and_schema():
    ds = generate_synthetic()
    assert ds.name == "synthetic" and (ds.rating_min, ds.rating_max) == (1.0, 5.0)
    inter = ds.interactions
    assert len(inter) == 12000 and len(ds.users) == 300 and len(ds.items) == 200
    assert [str(t) for t in inter.dtypes] == ["int64", "int64", "float64", "int64"]
    assert not inter.duplicated(["user", "item"]).any()
    assert set(inter["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert inter["user"].isin(ds.users["user"]).all() and inter["item"].isin(ds.items["item"]).all()
    assert list(ds.items.columns) == ["item", "title", "genres", "year"]
    assert str(ds.items["year"].dtype) == "Int64" and ds.items["item"].is_unique
    assert ds.items["title"].str.startswith("Synthetic Movie ").all()
    assert ds.items["genres"].ne("").all()
    assert list(ds.users.columns) == ["user", "gender", "age", "occupation"]
    assert inter["timestamp"].is_monotonic_increasing


def test_deterministic_per_seed():
    a, b, c = generate_synthetic(seed=3), generate_synthetic(seed=3), generate_synthetic(seed=4)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert not a.interactions.equals(c.interactions)


def test_sizes_are_configurable_and_dense_requests_fit():
    ds = load_dataset("synthetic", n_users=20, n_items=10, n_interactions=200, n_factors=15)
    assert len(ds.interactions) == 200 and ds.interactions.groupby("user").size().max() == 10
    with pytest.raises(ValueError, match="exceeds"):
        generate_synthetic(n_users=2, n_items=2, n_interactions=5)


def test_global_chronological_split_keeps_users_everywhere():
    inter = generate_synthetic().interactions  # already in time order
    n = len(inter)
    train, test = inter.iloc[: int(0.8 * n)], inter.iloc[int(0.9 * n):]
    assert test["user"].isin(train["user"]).all()
    assert test["user"].nunique() > 0.7 * inter["user"].nunique()


def test_label_is_learnable_from_history():
    ds = generate_synthetic()
    inter = ds.interactions.assign(label=lambda d: (d["rating"] > 3).astype(int))
    assert 0.35 < inter["label"].mean() < 0.65
    # Score each rating by the user's earlier like-rate on the item's main genre.
    genre = ds.items.set_index("item")["genres"].str.split("|").str[0]
    inter["genre"] = inter["item"].map(genre)
    groups = inter.groupby(["user", "genre"])["label"]
    inter["score"] = (groups.cumsum() - inter["label"] + 0.5) / (groups.cumcount() + 1)
    test = inter.iloc[int(0.9 * len(inter)):]
    assert auc(test["label"].to_numpy(), test["score"].to_numpy()) > 0.75


def test_a_book_catalog_keeps_the_ratings_and_renames_the_items():
    movies, books = generate_synthetic(seed=5), generate_synthetic(seed=5, item_noun="book")
    pd.testing.assert_frame_equal(movies.interactions, books.interactions)
    pd.testing.assert_frame_equal(movies.users, books.users)
    assert books.items["title"].str.fullmatch(r"Synthetic Book \d+: .+ Story").all()
    assert not books.items["title"].str.contains("Movie").any()
    genres = set(books.items["genres"].str.split("|").explode())
    assert genres <= {"Fantasy", "Mystery", "Romance", "Science Fiction"}
    assert (books.words.noun, books.words.plural, books.words.verb) == ("book", "books", "read")
    assert (movies.words.noun, movies.words.verb) == ("movie", "watched")
    with pytest.raises(ValueError, match="item noun"):
        generate_synthetic(item_noun="")
