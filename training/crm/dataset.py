"""Encode every sample of a split into CRM tensors once, so epochs only index into them.

The search unit's choices depend on fixed semantic embeddings only, so they are computed here
once per sample instead of on every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from service.crm.features import FeatureSpace
from service.crm.inputs import TargetInputs, UserInputs, build_inputs
from service.crm.model import CRMConfig
from training.data.samples import PreparedData


@dataclass
class EncodedSplit:
    user: UserInputs
    target: TargetInputs
    labels: torch.Tensor  # (N,) float
    # A knowledge CRM's user vectors: one table row per user, looked up per batch (a copy per
    # sample would take N x D floats).
    users: torch.Tensor | None = None  # (N,) user_idx
    knowledge: torch.Tensor | None = None  # (n_users + 1, D), zero rows: the CRM's default

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[UserInputs, TargetInputs, torch.Tensor]:
        u, t = self.user, self.target
        knowledge = self.knowledge[self.users[index]] if self.knowledge is not None else None
        return (
            UserInputs(u.user_fields[index], u.hist_stats[index], u.recent_items[index], u.recent_ratings[index],
                       knowledge),
            TargetInputs(t.targets[index], t.sel_items[index], t.sel_ratings[index], t.sel_stats[index]),
            self.labels[index],
        )


def encode_users(space: FeatureSpace, users: pd.DataFrame) -> np.ndarray:
    """(max user_idx + 1, F) field ids per user_idx."""
    table = np.zeros((int(users["user_idx"].max()) + 1, len(space.user_fields)), np.int64)
    for j, (name, vocab) in enumerate(space.user_fields.items()):
        lookup = {v: i + 1 for i, v in enumerate(vocab)}
        table[users["user_idx"].to_numpy(), j] = users[name].astype(str).map(lookup).fillna(0).to_numpy(np.int64)
    return table


def padded_histories(events: pd.DataFrame, hist_end: np.ndarray, hist_len: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned (N, length) item ids (0 pad) and ratings (NaN pad) of each sample's history."""
    items = events["item_idx"].to_numpy(np.int64)
    ratings = events["rating"].to_numpy(np.float32)
    cols = np.arange(length)
    pos = hist_end[:, None] - length + cols
    valid = cols >= length - np.minimum(hist_len, length)[:, None]
    pos = np.where(valid, pos, 0)
    return np.where(valid, items[pos], 0), np.where(valid, ratings[pos], np.nan).astype(np.float32)


def encode_split(data: PreparedData, split: str, space: FeatureSpace, config: CRMConfig,
                 item_embeddings: torch.Tensor, chunk: int = 2048, progress: bool = True,
                 user_knowledge: np.ndarray | None = None) -> EncodedSplit:
    return encode_samples(data, data.split(split), space, config, item_embeddings, chunk, progress, desc=split,
                          user_knowledge=user_knowledge)


def encode_samples(data: PreparedData, samples: pd.DataFrame, space: FeatureSpace, config: CRMConfig,
                   item_embeddings: torch.Tensor, chunk: int = 2048, progress: bool = True,
                   desc: str = "samples", user_knowledge: np.ndarray | None = None) -> EncodedSplit:
    """Encode any subset of ``data.samples`` (rows keep their order).

    A knowledge CRM (``config.knowledge_dim > 0``) needs ``user_knowledge``: (n_users + 1, D)
    vectors by user_idx, a zero row where a user has none (``KnowledgeArrays.user_table()``, or
    ``load_user_knowledge`` of a checkpoint). A plain CRM ignores it.
    """
    user_table = encode_users(space, data.users)
    knowledge = _user_knowledge_table(config, user_knowledge, samples)
    length = max(1, min(config.l_long, int(samples["hist_len"].max() if len(samples) else 1)))
    parts: list[tuple[UserInputs, TargetInputs]] = []
    for start in tqdm(range(0, len(samples), chunk), desc=f"encode {desc}", disable=not progress, leave=False):
        s = samples.iloc[start : start + chunk]
        hist_end, hist_len = s["hist_end"].to_numpy(), s["hist_len"].to_numpy()
        items, ratings = padded_histories(data.events, hist_end, hist_len, length)
        parts.append(build_inputs(
            space, user_fields=user_table[s["user_idx"].to_numpy()], hist_items=items, hist_ratings=ratings,
            hist_lengths=hist_len, targets=s["item_idx"].to_numpy(), item_embeddings=item_embeddings,
            l_long=config.l_long, l_crm=config.l_crm, l_recent=config.l_recent,
        ))
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    user = UserInputs(*(cat([getattr(p[0], f) for p in parts]) for f in ("user_fields", "hist_stats", "recent_items", "recent_ratings")))
    target = TargetInputs(*(cat([getattr(p[1], f) for p in parts]) for f in ("targets", "sel_items", "sel_ratings", "sel_stats")))
    labels = torch.tensor(samples["label"].to_numpy(np.float32))
    if knowledge is None:
        return EncodedSplit(user, target, labels)
    return EncodedSplit(user, target, labels, torch.as_tensor(samples["user_idx"].to_numpy(np.int64)), knowledge)


def _user_knowledge_table(config: CRMConfig, table: np.ndarray | None, samples: pd.DataFrame) -> torch.Tensor | None:
    """The user vector table as the CRM reads it (a non-finite row counts as missing, as in
    ``build_inputs``), checked against the config and the samples."""
    if not config.knowledge_dim:
        return None
    if table is None:
        raise ValueError("this CRM reads user knowledge vectors: pass user_knowledge (the knowledge's user_table(), "
                         "or load_user_knowledge of the checkpoint)")
    table = np.asarray(table, np.float32)
    if table.ndim != 2 or table.shape[1] != config.knowledge_dim:
        raise ValueError(f"user_knowledge is {table.shape}, this CRM reads {config.knowledge_dim}-d vectors")
    top = int(samples["user_idx"].max()) if len(samples) else 0
    if top >= len(table):
        raise ValueError(f"user_knowledge has {len(table)} rows, the samples need user_idx {top}")
    return torch.from_numpy(np.where(np.isfinite(table).all(1, keepdims=True), table, 0.0).astype(np.float32))
