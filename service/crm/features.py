"""How raw users, items and behaviours become CRM input ids; shared by training and serving.

The feature space is plain JSON in the bundle, so the runtime encodes a request exactly as the
trainer encoded its samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

UNKNOWN = 0  # index of unseen categorical values; padding for ids and rating levels too


class FeatureSpace(BaseModel):
    """Vocabularies that map raw values to embedding rows (row 0 = unknown / padding)."""

    model_config = ConfigDict(extra="forbid")

    n_items: int = Field(ge=1, description="item ids are 1..n_items; 0 is padding")
    user_fields: dict[str, list[str]] = Field(default_factory=dict)
    genres: list[str] = Field(default_factory=list)
    year_edges: list[int] = Field(default_factory=list, description="sorted bucket edges")
    rating_levels: list[float] = Field(min_length=1, description="sorted distinct ratings")
    rating_min: float
    rating_max: float
    label_threshold: float

    @property
    def n_year_buckets(self) -> int:
        return len(self.year_edges) + 2  # unknown + one more bucket than edges

    @property
    def n_rating_levels(self) -> int:
        return len(self.rating_levels) + 1

    def encode_user(self, profile: Mapping[str, object]) -> list[int]:
        """One id per user field; values never seen in training map to UNKNOWN."""
        out = []
        for name, vocab in self.user_fields.items():
            value = profile.get(name)
            try:
                out.append(vocab.index(str(value)) + 1 if value is not None else UNKNOWN)
            except ValueError:
                out.append(UNKNOWN)
        return out

    def rating_ids(self, ratings: np.ndarray) -> np.ndarray:
        """Nearest rating level (1-based); NaN (padding) maps to 0."""
        levels = np.asarray(self.rating_levels, dtype=np.float32)
        r = np.asarray(ratings, dtype=np.float32)
        idx = np.abs(r[..., None] - levels).argmin(-1) + 1
        return np.where(np.isnan(r), 0, idx).astype(np.int64)

    def year_ids(self, years: Iterable[float | int | None]) -> np.ndarray:
        out = []
        for y in years:
            if y is None or y is pd.NA or (isinstance(y, float) and math.isnan(y)):
                out.append(UNKNOWN)
            else:
                out.append(int(np.searchsorted(self.year_edges, int(y), side="right")) + 1)
        return np.asarray(out, dtype=np.int64)

    def genre_matrix(self, genres: Sequence[str]) -> np.ndarray:
        """Row-normalized multi-hot (len(genres) x n_genres) from '|'-joined genre strings."""
        index = {g: i for i, g in enumerate(self.genres)}
        m = np.zeros((len(genres), max(len(self.genres), 1)), dtype=np.float32)
        for row, text in enumerate(genres):
            for g in filter(None, str(text or "").split("|")):
                if g in index:
                    m[row, index[g]] = 1.0
        m /= np.maximum(m.sum(1, keepdims=True), 1.0)
        return m


def build_feature_space(
    users, items, *, rating_levels: Sequence[float], rating_min: float, rating_max: float,
    label_threshold: float, max_vocab: int = 1000, year_bucket: int = 5,
) -> FeatureSpace:
    """Vocabularies from the user and item tables (pandas frames with dense ids)."""
    fields = {}
    for col in users.columns:
        if col in ("user", "user_idx"):
            continue
        counts = users[col].astype(str).value_counts()
        fields[col] = sorted(counts.index[:max_vocab].tolist())
    genres = sorted({g for text in items["genres"].fillna("") for g in str(text).split("|") if g})
    years = items["year"].dropna().astype(int) if "year" in items else []
    edges: list[int] = []
    if len(years):
        lo, hi = int(years.min()), int(years.max())
        edges = list(range((lo // year_bucket + 1) * year_bucket, hi + 1, year_bucket))
    return FeatureSpace(
        n_items=int(items["item_idx"].max()),
        user_fields=fields,
        genres=genres,
        year_edges=edges,
        rating_levels=sorted({float(r) for r in rating_levels}),
        rating_min=rating_min,
        rating_max=rating_max,
        label_threshold=label_threshold,
    )
