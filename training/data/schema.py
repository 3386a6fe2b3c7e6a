"""The in-memory shape every dataset loader returns, whatever the source format.

Keeping one shape lets samples, splits, embeddings and the CRM ignore where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

INTERACTION_COLUMNS = ("user", "item", "rating", "timestamp")
ITEM_COLUMNS = ("item", "title", "genres", "year")


@dataclass(frozen=True)
class RawDataset:
    """A recommendation dataset with raw (source) ids.

    interactions: columns user (int64), item (int64), rating (float64), timestamp (int64, seconds).
    items: columns item (int64, unique), title (str), genres (str, '|'-separated, may be empty),
        year (Int64, nullable); extra text columns may follow and are kept for prompts.
    users: column user (int64, unique) plus categorical profile columns (str), e.g. gender, age,
        occupation; may have only the user column when the source has no profiles.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    rating_min: float
    rating_max: float
