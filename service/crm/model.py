"""The CRM network: item encoder, target-independent user tower, DIN target attention.

Output contract (read by the personalized-LoRA gate): ``user_representation`` is a float
vector of size ``CRMConfig.user_dim`` (default 64) computed from the user profile, summary
statistics of the long history and attention pooling over the most recent ``l_recent``
behaviours. It does not depend on the candidate, so one representation (and one adapter)
serves all candidates of a request. The click logit adds DIN attention over the behaviours the
search unit picked for each candidate.

With ``knowledge_dim > 0`` the CRM also reads LLM knowledge vectors (``service.crm.knowledge``):
the item adaptor's output joins every catalog vector (so targets and behaviours carry it) and the
user adaptor's output joins the user tower's input (so the user representation, and with it the
LoRA gate, carries it too). With ``knowledge_dim == 0`` none of these parts exist.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from service.crm.inputs import N_HIST_STATS, TargetInputs, UserInputs
from service.crm.knowledge import ITEM, USER, HybridExpertAdaptor


class CRMConfig(BaseModel):
    """Architecture and history lengths; stored in the bundle next to the weights."""

    model_config = ConfigDict(extra="forbid")

    n_items: int = Field(ge=1)
    user_field_sizes: list[int] = Field(default_factory=list, description="vocab size per user field (incl. unknown)")
    n_genres: int = Field(ge=1)
    n_year_buckets: int = Field(ge=1)
    n_rating_levels: int = Field(ge=2)
    semantic_dim: int = Field(ge=1)
    emb_dim: int = 32
    user_dim: int = 64
    attn_hidden: int = 64
    mlp_hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = 0.1
    l_long: int = Field(default=1000, ge=1, description="history length read from the store")
    l_crm: int = Field(default=60, ge=1, description="behaviours kept by the search unit per target")
    l_recent: int = Field(default=60, ge=1, description="recent behaviours pooled into the user vector")
    knowledge_dim: int = Field(default=0, ge=0, description="LLM knowledge vector size; 0 = no knowledge")
    knowledge_experts_shared: int = Field(default=2, ge=0, description="adaptor experts shared by item and user")
    knowledge_experts_per_type: int = Field(default=6, ge=0, description="adaptor experts of each knowledge type")
    knowledge_hidden: int = Field(default=128, ge=1)
    knowledge_out: int = Field(default=32, ge=1)


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class TargetAttention(nn.Module):
    """DIN activation unit: weight each behaviour by an MLP of (query, key, q-k, q*k)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.mlp(torch.cat([q, keys, q - keys, q * keys], -1)).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no behaviour pool to zero
        return (weights.unsqueeze(-1) * values).sum(1)


class CRM(nn.Module):
    def __init__(self, config: CRMConfig) -> None:
        super().__init__()
        self.config = c = config
        e = c.emb_dim
        self.item_id = nn.Embedding(c.n_items + 1, e, padding_idx=0)
        self.item_bias = nn.Embedding(c.n_items + 1, 1, padding_idx=0)
        self.genre = nn.Linear(c.n_genres, e, bias=False)
        self.year = nn.Embedding(c.n_year_buckets, e)
        self.semantic = nn.Linear(c.semantic_dim, e, bias=False)
        self.rating = nn.Embedding(c.n_rating_levels, e, padding_idx=0)
        self.user_fields = nn.ModuleList(nn.Embedding(n, e) for n in c.user_field_sizes)
        # Item side features come from the catalog, not from requests; set by set_item_features.
        self.register_buffer("item_genres", torch.zeros(c.n_items + 1, c.n_genres), persistent=False)
        self.register_buffer("item_years", torch.zeros(c.n_items + 1, dtype=torch.long), persistent=False)
        self.register_buffer("item_semantic", torch.zeros(c.n_items + 1, c.semantic_dim), persistent=False)

        behaviour = 2 * e
        self.recent_query = nn.Parameter(torch.zeros(behaviour))
        self.recent_attn = TargetAttention(behaviour, c.attn_hidden)
        user_in = len(c.user_field_sizes) * e + 2 * behaviour + N_HIST_STATS
        user_in += c.knowledge_out if c.knowledge_dim else 0
        self.user_tower = nn.Sequential(nn.Linear(user_in, c.user_dim), nn.ReLU(), nn.Linear(c.user_dim, c.user_dim))
        self.din = TargetAttention(e, c.attn_hidden)
        self.head = nn.Sequential(_mlp([c.user_dim + e + behaviour + 2, *c.mlp_hidden], c.dropout), nn.Linear(c.mlp_hidden[-1], 1))
        # Wide part: linear signals (item bias, a linear read of the user vector, the ratings of
        # similar behaviours) go straight to the logit; the deep head learns the interactions.
        self.user_skip = nn.Linear(user_in, c.user_dim, bias=False)
        self.wide = nn.Linear(c.user_dim + 2, 1)
        if c.knowledge_dim:
            self.knowledge = HybridExpertAdaptor(
                c.knowledge_dim, n_shared=c.knowledge_experts_shared, n_per_type=c.knowledge_experts_per_type,
                hidden=c.knowledge_hidden, out=c.knowledge_out, dropout=c.dropout)
            self.item_knowledge = nn.Linear(c.knowledge_out, e, bias=False)
            # Like the catalog features: set by set_item_knowledge, stored beside the weights.
            self.register_buffer("item_knowledge_vectors", torch.zeros(c.n_items + 1, c.knowledge_dim),
                                 persistent=False)
            self.register_buffer("user_knowledge_default", torch.zeros(c.knowledge_dim), persistent=False)

    def set_item_features(self, genres: torch.Tensor, years: torch.Tensor, semantic: torch.Tensor) -> None:
        """Install catalog features: (n_items+1, n_genres), (n_items+1,), (n_items+1, semantic_dim)."""
        self.item_genres.copy_(genres)
        self.item_years.copy_(years)
        self.item_semantic.copy_(semantic)

    def set_item_knowledge(self, item_vectors: torch.Tensor, user_default: torch.Tensor) -> None:
        """Install knowledge: (n_items+1, knowledge_dim) item vectors and the (knowledge_dim,)
        vector read for a user who has none (the mean of the training users' vectors)."""
        if not self.config.knowledge_dim:
            raise ValueError("this CRM reads no knowledge (knowledge_dim = 0)")
        rows, dim = self.item_knowledge_vectors.shape
        if tuple(item_vectors.shape) != (rows, dim) or tuple(user_default.shape) != (dim,):
            raise ValueError(f"knowledge item vectors {tuple(item_vectors.shape)} and user default "
                             f"{tuple(user_default.shape)} do not fit this CRM: it needs ({rows}, {dim}) and ({dim},)")
        self.item_knowledge_vectors.copy_(item_vectors)
        self.user_knowledge_default.copy_(user_default)

    def user_knowledge(self, user: UserInputs) -> torch.Tensor:
        """(B, knowledge_dim) user vectors: the default where ``user.knowledge`` is None or a row is all zeros."""
        default = self.user_knowledge_default.expand(len(user.hist_stats), -1)
        if user.knowledge is None:
            return default
        if user.knowledge.shape != default.shape:
            raise ValueError(f"user knowledge is {tuple(user.knowledge.shape)}, this CRM reads {tuple(default.shape)}")
        missing = (user.knowledge == 0).all(1, keepdim=True)
        return torch.where(missing, default, user.knowledge)

    def item_table(self) -> torch.Tensor:
        """(n_items+1, emb_dim) vectors of the whole catalog; row 0 (padding) is zero.

        Projecting the catalog once per forward is cheaper than projecting every looked-up
        behaviour (a batch touches far more behaviours than the catalog has items).
        """
        table = self.item_id.weight + self.genre(self.item_genres) + self.year(self.item_years)
        table = table + self.semantic(self.item_semantic)
        if self.config.knowledge_dim:
            table = table + self.item_knowledge(self.knowledge(ITEM, self.item_knowledge_vectors))
        return torch.cat([torch.zeros_like(table[:1]), table[1:]])

    def behaviours(self, table: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        return torch.cat([table[items], self.rating(ratings)], -1)

    def user_representation(self, user: UserInputs, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, user_dim) target-independent user vector; see the module docstring."""
        table = self.item_table() if table is None else table
        mask = user.recent_items != 0
        beh = self.behaviours(table, user.recent_items, user.recent_ratings)
        count = mask.sum(1, keepdim=True).clamp(min=1)
        mean = (beh * mask.unsqueeze(-1)).sum(1) / count
        query = self.recent_query.expand(len(beh), -1)
        pooled = self.recent_attn(query, beh, beh, mask)
        profile = [emb(user.user_fields[:, i]) for i, emb in enumerate(self.user_fields)]
        extra = [self.knowledge(USER, self.user_knowledge(user))] if self.config.knowledge_dim else []
        features = torch.cat([*profile, mean, pooled, user.hist_stats, *extra], -1)
        return self.user_tower(features) + self.user_skip(features)

    def score(self, user_rep: torch.Tensor, target: TargetInputs, table: torch.Tensor | None = None) -> torch.Tensor:
        """(C,) click logits; user_rep is (C, user_dim) or (1, user_dim) shared by all targets."""
        table = self.item_table() if table is None else table
        tgt = table[target.targets]
        keys = table[target.sel_items]
        values = torch.cat([keys, self.rating(target.sel_ratings)], -1)
        interest = self.din(tgt, keys, values, target.sel_items != 0)
        user_rep = user_rep.expand(len(tgt), -1)
        deep = self.head(torch.cat([user_rep, tgt, interest, target.sel_stats], -1)).squeeze(-1)
        wide = self.wide(torch.cat([user_rep, target.sel_stats], -1)).squeeze(-1)
        return deep + wide + self.item_bias(target.targets).squeeze(-1)

    def forward(self, user: UserInputs, target: TargetInputs) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.item_table()
        rep = self.user_representation(user, table)
        return self.score(rep, target, table), rep
