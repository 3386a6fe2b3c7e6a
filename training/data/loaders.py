"""One entry point from a dataset kind to a ``RawDataset``, so the CLI stays format-agnostic."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from training.data.csv_format import PathArg, load_csv_dataset
from training.data.movielens import load_ml100k, load_ml1m
from training.data.schema import RawDataset
from training.data.synthetic import generate_synthetic


def load_ml_latest(directory: PathArg, drop_unknown_items: bool = False) -> RawDataset:
    """MovieLens "latest" (e.g. ml-latest-small): ratings.csv + movies.csv, 0.5..5 stars; with
    ``drop_unknown_items`` ratings of movies that movies.csv lacks are left out and counted."""
    root = Path(directory)
    return load_csv_dataset(
        root / "ratings.csv", root / "movies.csv",
        user_col="userId", item_col="movieId", item_id_col="movieId",
        rating_min=0.5, rating_max=5.0, drop_unknown_items=drop_unknown_items, name=root.name or "ml-latest",
    )


LOADERS: dict[str, Callable[..., RawDataset]] = {
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "ml-latest": load_ml_latest,
    "csv": load_csv_dataset,
    "synthetic": generate_synthetic,
}


def load_dataset(kind: str, **kwargs) -> RawDataset:
    """Load a dataset of ``kind``; ``kwargs`` go to that kind's loader unchanged."""
    try:
        loader = LOADERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown dataset kind {kind!r}; choose from {', '.join(LOADERS)}"
        ) from None
    return loader(**kwargs)
