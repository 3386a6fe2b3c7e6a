"""Assemble a ready CRM from its config, feature space, weights and the item catalog."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from service.crm.features import FeatureSpace
from service.crm.model import CRM, CRMConfig


def item_feature_tensors(space: FeatureSpace, catalog: pd.DataFrame, embeddings: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Genre multi-hot, year bucket and semantic rows indexed by item_idx (row 0 = padding)."""
    n = space.n_items + 1
    idx = catalog["item_idx"].to_numpy(np.int64)
    genres = np.zeros((n, max(len(space.genres), 1)), np.float32)
    genres[idx] = space.genre_matrix(catalog["genres"].fillna("").tolist())
    years = np.zeros(n, np.int64)
    years[idx] = space.year_ids(catalog["year"].tolist() if "year" in catalog else [None] * len(idx))
    if embeddings.shape[0] != n:
        raise ValueError(f"embeddings have {embeddings.shape[0]} rows, the catalog needs {n}")
    return torch.from_numpy(genres), torch.from_numpy(years), torch.from_numpy(np.asarray(embeddings, np.float32))


def build_crm(config: CRMConfig, space: FeatureSpace, catalog: pd.DataFrame, embeddings: np.ndarray,
              state_dict: dict[str, torch.Tensor] | None = None,
              knowledge: tuple[np.ndarray, np.ndarray] | None = None) -> CRM:
    """A CRM with catalog features installed and, when given, trained weights loaded strictly and
    ``knowledge`` = (item vectors, user default vector) installed."""
    model = CRM(config)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    model.set_item_features(*item_feature_tensors(space, catalog, embeddings))
    if knowledge is not None:
        model.set_item_knowledge(*(torch.from_numpy(np.asarray(a, np.float32)) for a in knowledge))
    return model


def config_for(space: FeatureSpace, semantic_dim: int, **overrides) -> CRMConfig:
    """A CRMConfig sized for ``space``; keyword overrides set the architecture and lengths."""
    return CRMConfig(
        n_items=space.n_items,
        user_field_sizes=[len(v) + 1 for v in space.user_fields.values()],
        n_genres=max(len(space.genres), 1),
        n_year_buckets=space.n_year_buckets,
        n_rating_levels=space.n_rating_levels,
        semantic_dim=semantic_dim,
        **overrides,
    )
