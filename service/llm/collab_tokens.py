"""Collaborative tokens: the frozen CRM's user and item vectors as tokens of the LLM's prompt.

CoLLM's deep integration of a CRM and an LLM: a small MLP maps the CRM's user representation,
and another each candidate's CRM item vector, into the LLM's embedding space, and the prompt
carries them as tokens. The user token closes the prompt's prefix (computed once per request in
the shared form), the item token sits in each candidate's suffix right after the candidate's
question, before the turn's end. The projector is trained jointly with the LoRA; the CRM stays
frozen.

In token sequences a collaborative token is a placeholder: a spare special token of the
tokenizer (``placeholder_id``) in training and offline scoring, whose embedding row the forward
replaces (``replace_placeholders``); the first placeholder of a unit is its user's, the others
its candidates', in order. Towards an engine the placeholders become call-relative ids at or
above ``EMBED_ID_BASE`` (``engine_ids``): id ``EMBED_ID_BASE + k`` reads row ``k`` of the call's
embeddings (row 0 the user, row 1 + j candidate j), so two candidates' suffixes never share a
run past their item tokens, and tokens stay plain ids everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

CONFIG_FILE, WEIGHTS_FILE = "collab.json", "collab.safetensors"  # beside a trained LoRA's files
BUNDLE_CONFIG, BUNDLE_WEIGHTS = "collab/config.json", "collab/weights.safetensors"
EMBED_ID_BASE = 1 << 30  # engine token ids from here on name rows of the call's embeddings


class CollabConfig(BaseModel):
    """The projector's shape, stored beside its weights."""

    model_config = ConfigDict(extra="forbid")

    user_dim: int = Field(ge=1)  # the CRM's user representation
    item_dim: int = Field(ge=1)  # the CRM's item vectors (``CRM.item_table``)
    hidden_size: int = Field(ge=1)  # the LLM's embedding size
    mlp_hidden: int = Field(default=256, ge=1)


def _mlp(d_in: int, cfg: CollabConfig) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear; the output layer starts at zero, so an untrained projector
    leaves every collaborative token a zero vector rather than noise in the prompt."""
    net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, cfg.mlp_hidden), nn.GELU(),
                        nn.Linear(cfg.mlp_hidden, cfg.hidden_size))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class CollabProjector(nn.Module):
    """CRM user vector -> user token embedding; CRM item vector -> item token embedding."""

    def __init__(self, cfg: CollabConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user = _mlp(cfg.user_dim, cfg)
        self.item = _mlp(cfg.item_dim, cfg)

    def forward(self, user_reps: torch.Tensor, item_reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, hidden) and (items, hidden) token embeddings, in float32."""
        return self.user(user_reps.float()), self.item(item_reps.float())

    def embeds(self, user_rep: torch.Tensor, item_reps: torch.Tensor) -> torch.Tensor:
        """One request's rows for the engine: (1 + candidates, hidden), the user's first."""
        user, items = self(user_rep.reshape(1, -1), item_reps)
        return torch.cat([user, items])

    @classmethod
    def from_state(cls, cfg: CollabConfig, state: dict[str, torch.Tensor]) -> "CollabProjector":
        """A projector from saved weights; the names and shapes must be the config's."""
        projector = cls(cfg)
        own = projector.state_dict()
        if set(state) != set(own) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in own.items()):
            raise ValueError(f"collaborative-token weights do not fit their config {cfg.model_dump()}")
        projector.load_state_dict(state)
        return projector.eval()

    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, out_dir / WEIGHTS_FILE)
        (out_dir / CONFIG_FILE).write_text(self.cfg.model_dump_json(indent=2))

    @classmethod
    def load(cls, out_dir: Path) -> "CollabProjector":
        from safetensors.torch import load_file

        cfg = CollabConfig.model_validate_json((out_dir / CONFIG_FILE).read_text())
        return cls.from_state(cfg, load_file(out_dir / WEIGHTS_FILE))


def choose_placeholder(tokenizer, template_ids: Sequence[int]) -> int:
    """A spare special token: one of the tokenizer's added tokens that the prompt's template does
    not use and that no text turns into (not the unknown token); the last such, preferring one
    that is not the padding token. Its own embedding never reaches the model."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    taken = set(template_ids) | {getattr(tokenizer, "unk_token_id", None)}
    spare = [i for i in sorted(decoder) if i not in taken and getattr(decoder[i], "special", True)]
    if not spare:
        raise ValueError("the tokenizer has no spare special token to hold a collaborative token's place")
    pad = getattr(tokenizer, "pad_token_id", None)
    preferred = [i for i in spare if i != pad]
    return (preferred or spare)[-1]


def with_placeholders(prefix: list[int], suffixes: list[list[int]], placeholder: int,
                      end: int) -> tuple[list[int], list[list[int]]]:
    """The prompt with the user token closing the prefix and each candidate's item token before
    its last ``end`` tokens (the turn's end and the assistant header)."""
    if placeholder in prefix or any(placeholder in s for s in suffixes):
        raise ValueError(f"the prompt's text already holds the collaborative placeholder token {placeholder}")
    return prefix + [placeholder], [s[: len(s) - end] + [placeholder] + s[len(s) - end :] for s in suffixes]


def engine_ids(prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
               placeholder: int) -> tuple[list[int], list[list[int]]]:
    """The prompt as an engine takes it: the prefix's placeholder reads row 0 of the call's
    embeddings, suffix j's row 1 + j."""
    def swap(ids: Sequence[int], row: int) -> list[int]:
        return [EMBED_ID_BASE + row if t == placeholder else t for t in ids]

    return swap(prefix, 0), [swap(s, 1 + j) for j, s in enumerate(suffixes)]


def replace_placeholders(embed: nn.Module, ids: torch.Tensor, placeholder: int, vectors: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Input embeddings of ``ids`` (B, T) with the placeholders' rows, in row-major order (the
    ``mask``'s real tokens only), replaced by ``vectors`` (n, hidden); gradients reach them."""
    hidden = embed(ids)
    at = ids == placeholder
    if mask is not None:
        at = at & mask.bool()
    n = int(at.sum())
    if n != len(vectors):
        raise ValueError(f"{n} collaborative placeholders but {len(vectors)} vectors")
    rows, cols = at.nonzero(as_tuple=True)  # row-major
    return hidden.index_put((rows, cols), vectors.to(hidden.dtype))  # out of place: the graph stays
