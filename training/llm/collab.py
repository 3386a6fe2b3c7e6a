"""Collaborative tokens on the training side: the projector's vectors placed in training and
scoring forwards (``service.llm.collab_tokens`` has the projector and the placeholders).

A unit (a prompt, or a request of several candidates) carries one user placeholder, closing its
prefix, and one item placeholder per candidate, in order; its vectors are laid out the same way
(``unit_vectors``), so a row-major scan of a batch's placeholders meets them in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.crm.model import CRM
from service.llm.collab_tokens import CollabConfig, CollabProjector, replace_placeholders


@dataclass
class CollabInputs:
    """What a run's forwards need for collaborative tokens: the projector being trained, the
    prompt's placeholder id, and the frozen CRM's item vector of every instance's candidate."""

    projector: CollabProjector
    placeholder: int
    items: torch.Tensor  # (N, item_dim), per instance


def new_projector(crm: CRM, model, mlp_hidden: int = 256) -> CollabProjector:
    """A fresh projector from the CRM's user and item sizes to the LLM's embedding size."""
    cfg = CollabConfig(user_dim=crm.config.user_dim, item_dim=crm.config.emb_dim,
                       hidden_size=model.get_input_embeddings().weight.shape[1], mlp_hidden=mlp_hidden)
    return CollabProjector(cfg).to(model.device)


def unit_vectors(projector: CollabProjector, user_reps: torch.Tensor, item_reps: torch.Tensor,
                 counts: Sequence[int]) -> torch.Tensor:
    """(units + items, hidden): per unit its user's token, then its ``counts[u]`` candidates' tokens
    (``item_reps`` holds every unit's candidates in order)."""
    users, items = projector(user_reps, item_reps)
    order, item_at = [], len(users)
    for u, n in enumerate(counts):
        order.append(u)
        order += range(item_at, item_at + n)
        item_at += n
    return torch.cat([users, items])[torch.as_tensor(order, device=users.device)]


def collab_embeds(model, ids: torch.Tensor, placeholder: int, vectors: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The input embeddings of ``ids`` with the placeholders' rows replaced by ``vectors``."""
    return replace_placeholders(model.get_input_embeddings(), ids, placeholder, vectors, mask)
