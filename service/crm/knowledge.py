"""LLM knowledge for the CRM: the hybrid-expert adaptor (KAR) and the knowledge config of a bundle.

Knowledge is text an LLM wrote offline (one text per item, one per user about their preferences),
encoded into D-dim vectors. The adaptor turns a vector into the recommender's space: per knowledge
type (item, user), a softmax gate mixes the shared experts and the type's own experts, each an MLP
D -> hidden -> out. Shared experts let the two types inform each other; own experts keep what is
particular to each. The CRM applies the item type to its whole catalog once per forward (once per
version when serving) and the user type to one vector per user, so knowledge costs almost nothing
per request.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

ITEM, USER = 0, 1  # knowledge types, in the order of the adaptor's gates
N_TYPES = 2


class KnowledgeConfig(BaseModel):
    """What produced a version's knowledge vectors: serving checks a stored user vector against
    ``encoder`` and ``dim``, and regenerates user texts with ``prompts`` and ``generator``."""

    model_config = ConfigDict(extra="ignore")

    encoder: str = Field(min_length=1)
    dim: int = Field(ge=1)
    cutoff_timestamp: int | None = None
    max_new_tokens: int | None = None
    prompts: dict[str, Any] = Field(default_factory=dict)
    generator: dict[str, Any] = Field(default_factory=dict)

    def decoding(self, default_max_new_tokens: int) -> dict[str, Any]:
        """``generate_greedy``'s decoding arguments as the offline texts were made, so a refreshed
        text is decoded the same way (``default_max_new_tokens`` when the config does not say)."""
        return {"max_new_tokens": int(self.max_new_tokens or default_max_new_tokens),
                "repetition_penalty": float(self.generator.get("repetition_penalty") or 1.0)}


class ExpertBank(nn.Module):
    """``n`` expert MLPs (dim -> hidden -> out, ReLU and dropout after each layer, as in KAR),
    their weights stacked so the first layers of all experts are one matmul."""

    def __init__(self, n: int, dim: int, hidden: int, out: int, dropout: float) -> None:
        super().__init__()
        self.n, self.hidden = n, hidden
        self.w1 = nn.Parameter(torch.empty(dim, n, hidden))
        self.b1 = nn.Parameter(torch.empty(n, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, out))
        self.b2 = nn.Parameter(torch.empty(n, out))
        self.dropout = nn.Dropout(dropout)
        for w, b, fan_in in ((self.w1, self.b1, dim), (self.w2, self.b2, hidden)):  # nn.Linear's init
            bound = fan_in ** -0.5
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N, n, out)."""
        h = (x @ self.w1.flatten(1)).view(len(x), self.n, self.hidden) + self.b1
        h = self.dropout(torch.relu(h))
        return self.dropout(torch.relu(torch.einsum("neh,eho->neo", h, self.w2) + self.b2))


class HybridExpertAdaptor(nn.Module):
    """KAR's hybrid-expert adaptor over ``N_TYPES`` knowledge types sharing ``n_shared`` experts."""

    def __init__(self, dim: int, *, n_shared: int, n_per_type: int, hidden: int, out: int,
                 dropout: float, n_types: int = N_TYPES) -> None:
        super().__init__()
        if n_shared + n_per_type < 1:
            raise ValueError("the knowledge adaptor needs at least one expert per type")
        self.shared = ExpertBank(n_shared, dim, hidden, out, dropout) if n_shared else None
        self.own = nn.ModuleList(ExpertBank(n_per_type, dim, hidden, out, dropout)
                                 for _ in range(n_types)) if n_per_type else None
        self.gates = nn.ModuleList(nn.Linear(dim, n_shared + n_per_type) for _ in range(n_types))

    def gate(self, kind: int, x: torch.Tensor) -> torch.Tensor:
        """(N, n_shared + n_per_type) softmax weights of type ``kind`` over its experts."""
        return torch.softmax(self.gates[kind](x), -1)

    def forward(self, kind: int, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) knowledge vectors of type ``kind`` -> (N, out)."""
        experts = []
        if self.shared is not None:
            experts.append(self.shared(x))
        if self.own is not None:
            experts.append(self.own[kind](x))
        mixed = torch.cat(experts, 1) if len(experts) > 1 else experts[0]  # (N, E, out)
        return (self.gate(kind, x).unsqueeze(-1) * mixed).sum(1)
