"""Build CRM input tensors from padded histories: the SIM general search unit lives here.

Histories are right-aligned (most recent behaviour in the last column, padding id 0 on the
left), so the same code serves a training batch (one history per sample) and a request (one
history shared by every candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.crm.features import FeatureSpace


@dataclass
class UserInputs:
    """Target-independent part: what the user representation is computed from."""

    user_fields: torch.Tensor  # (B, F) long
    hist_stats: torch.Tensor  # (B, N_HIST_STATS) float, see history_stats
    recent_items: torch.Tensor  # (B, R) long
    recent_ratings: torch.Tensor  # (B, R) long rating-level ids
    knowledge: torch.Tensor | None = None  # (B, D) float knowledge vectors; None or a zero row: the default


@dataclass
class TargetInputs:
    """Per-target part: the candidate and the behaviours the search unit picked for it."""

    targets: torch.Tensor  # (C,) long
    sel_items: torch.Tensor  # (C, K) long
    sel_ratings: torch.Tensor  # (C, K) long
    sel_stats: torch.Tensor  # (C, 2) float: rating summary of the most similar behaviours


N_HIST_STATS = 5


def history_stats(space: FeatureSpace, ratings: np.ndarray, lengths: np.ndarray, l_long: int,
                  recent: int = 10) -> np.ndarray:
    """(B, N_HIST_STATS) summary of right-aligned raw ratings (NaN = padding): scaled mean
    rating, positive share, the same two over the last ``recent`` behaviours, log-length."""
    def summary(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = ~np.isnan(r)
        n = valid.sum(1)
        safe = np.where(valid, r, 0.0)
        mean = np.where(n > 0, (safe.sum(1) / np.maximum(n, 1) - space.rating_min) / span, 0.5)
        pos = np.where(n > 0, ((safe > space.label_threshold) & valid).sum(1) / np.maximum(n, 1), 0.5)
        return mean, pos

    span = max(space.rating_max - space.rating_min, 1e-6)
    mean, pos = summary(ratings)
    recent_mean, recent_pos = summary(ratings[:, -recent:])
    length = np.log1p(np.minimum(lengths, l_long)) / np.log1p(l_long)
    return np.stack([mean, pos, recent_mean, recent_pos, length], 1).astype(np.float32)


def search_behaviours(hist_items: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SIM general search unit: per target, the k history positions most similar to it.

    Similarity is the dot product of normalized semantic item embeddings. Returns (C, k)
    positions into the history (ascending, so picked behaviours keep chronological order) and
    their similarity (-inf where the history has fewer than k behaviours). ``hist_items`` is
    (H, L) with H = 1 (one history shared by all targets) or H = len(targets).
    """
    tgt = item_embeddings[targets]  # (C, d)
    if hist_items.shape[0] == 1:
        sim = tgt @ item_embeddings[hist_items[0]].T  # (C, L)
    else:  # score the catalog once per target, then gather: far less memory traffic than (C, L, d)
        sim = torch.gather(tgt @ item_embeddings.T, 1, hist_items)
    sim = sim.masked_fill(hist_items.expand(len(targets), -1) == 0, float("-inf"))
    top = sim.topk(min(k, hist_items.shape[1]), dim=1).indices.sort(dim=1).values
    return top, torch.gather(sim, 1, top)


def similar_rating_stats(space: FeatureSpace, ratings: torch.Tensor, sim: torch.Tensor, k: int) -> torch.Tensor:
    """(C, 2): scaled mean rating and positive share of the k behaviours most similar to each target."""
    top = sim.topk(min(k, sim.shape[1]), dim=1)
    r = torch.gather(ratings, 1, top.indices)
    valid = torch.isfinite(top.values)
    n = valid.sum(1).clamp(min=1)
    span = max(space.rating_max - space.rating_min, 1e-6)
    mean = torch.where(valid, (r - space.rating_min) / span, 0.0).sum(1) / n
    pos = torch.where(valid, (r > space.label_threshold).float(), 0.0).sum(1) / n
    empty = ~valid.any(1)
    return torch.stack([mean.masked_fill(empty, 0.5), pos.masked_fill(empty, 0.5)], 1)


def build_inputs(
    space: FeatureSpace, *, user_fields: np.ndarray, hist_items: np.ndarray, hist_ratings: np.ndarray,
    hist_lengths: np.ndarray, targets: np.ndarray, item_embeddings: torch.Tensor, l_long: int, l_crm: int,
    l_recent: int, n_similar: int = 10, user_knowledge: np.ndarray | None = None,
) -> tuple[UserInputs, TargetInputs]:
    """Encode right-aligned padded histories (B, L) and targets (C,) into CRM tensors.

    ``hist_ratings`` holds raw ratings with NaN at padding; histories longer than ``l_long``
    are cut to their most recent ``l_long`` behaviours. ``user_knowledge`` (B, D) or (D,) holds
    the users' knowledge vectors for a knowledge CRM; a row that is all zeros or not finite
    counts as missing, and the CRM reads its default vector there.
    """
    if hist_items.shape[1] == 0:  # cold start: one padding column keeps every shape valid
        hist_items = np.zeros((hist_items.shape[0], 1), dtype=np.int64)
        hist_ratings = np.full((hist_items.shape[0], 1), np.nan, dtype=np.float32)
    hist_items = hist_items[:, -l_long:]
    hist_ratings = hist_ratings[:, -l_long:]
    rating_ids = space.rating_ids(hist_ratings)
    items_t = torch.as_tensor(hist_items, dtype=torch.long)
    ratings_t = torch.as_tensor(rating_ids, dtype=torch.long)
    targets_t = torch.tensor(np.asarray(targets, dtype=np.int64))
    top, sim = search_behaviours(items_t, targets_t, item_embeddings, l_crm)
    empty = torch.isinf(sim)
    shared = lambda t: t.expand(len(targets_t), -1)  # noqa: E731 (H = 1 broadcasts over targets)
    sel_items = torch.gather(shared(items_t), 1, top).masked_fill(empty, 0)
    sel_ratings = torch.gather(shared(ratings_t), 1, top).masked_fill(empty, 0)
    raw = torch.gather(shared(torch.from_numpy(np.asarray(hist_ratings, np.float32))), 1, top)
    sel_stats = similar_rating_stats(space, raw, sim, k=n_similar)
    recent = min(l_recent, items_t.shape[1])
    knowledge = None
    if user_knowledge is not None:
        k = np.asarray(user_knowledge, np.float32).reshape(-1, np.shape(user_knowledge)[-1])
        if len(k) != len(user_fields):
            raise ValueError(f"user_knowledge has {len(k)} rows for {len(user_fields)} users")
        knowledge = torch.from_numpy(np.where(np.isfinite(k).all(1, keepdims=True), k, 0.0).astype(np.float32))
    user = UserInputs(
        user_fields=torch.as_tensor(user_fields, dtype=torch.long),
        hist_stats=torch.from_numpy(history_stats(space, hist_ratings, hist_lengths, l_long)),
        recent_items=items_t[:, items_t.shape[1] - recent :],
        recent_ratings=ratings_t[:, ratings_t.shape[1] - recent :],
        knowledge=knowledge,
    )
    return user, TargetInputs(targets=targets_t, sel_items=sel_items, sel_ratings=sel_ratings, sel_stats=sel_stats)
