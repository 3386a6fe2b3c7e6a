"""One optimizer step of LLM training: the instances, the two objectives, and the micro-batches.

Micro-batches are packed by default (``training.llm.packing``: one padding-free row per
micro-batch, attention kept within each instance); ``packing=False`` runs right-padded rows
instead. A step covers ``batch_size * grad_accum`` instances either way; ``pack_tokens`` only
changes how a step's instances are split into forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from service.llm.personalized_lora import PersonalizedLoRA
from service.model.fusion import Fusion
from training.llm.packing import pack, packed_answer_hidden, token_budget_groups
from training.llm.scoring import answer_hidden, label_logits, pad_right


class Batching(Protocol):
    """How a step's instances are split into forwards (``LLMTrainConfig`` has these fields)."""

    packing: bool
    pack_tokens: int  # a packed micro-batch's token budget; 0: batch_size instances each
    batch_size: int


@dataclass
class TrainSet:
    """Training instances, tokenized once per run, with what the objectives need of each."""

    tokens: list[torch.Tensor]  # (L_i,) token ids of each prompt, on the model's device
    reps: torch.Tensor  # (N, user_dim) frozen CRM user vectors
    labels: torch.Tensor  # (N,) 1.0 / 0.0
    answers: torch.Tensor  # (N,) the answer token: yes_id or no_id
    crm_logits: torch.Tensor | None = None  # (N,) the frozen CRM's logits (fused objective)

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], reps: torch.Tensor, labels: Sequence[int], yes_id: int,
              no_id: int, device: torch.device, crm_logits: torch.Tensor | None = None) -> "TrainSet":
        y = torch.as_tensor(np.asarray(labels, dtype=np.float32), device=device)
        return cls(tokens=[torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts], reps=reps.to(device),
                   labels=y, answers=torch.where(y > 0, yes_id, no_id).long(),
                   crm_logits=None if crm_logits is None else crm_logits.to(device))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> list[int]:
        return [int(t.numel()) for t in self.tokens]


class AnswerLoss(torch.nn.Module):
    """Full-vocabulary cross entropy of the answer token at the answer position, in float32; the
    frozen output embedding is converted to float32 once per run, not per micro-batch."""

    def __init__(self, model) -> None:
        super().__init__()
        self._weight = model.get_output_embeddings().weight.detach().float()

    def forward(self, hidden: torch.Tensor, data: TrainSet, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(hidden.float() @ self._weight.T, data.answers[rows])


class FusedLoss(torch.nn.Module):
    """Binary cross entropy of w * CRM logit + (logit_Yes - logit_No) + b: the LLM's logit is
    logit(P(Yes)) of a softmax over [Yes, No], so ``fusion()`` is serving's Fusion (w_llm = 1)."""

    def __init__(self, model, yes_id: int, no_id: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), device=model.device))
        self.b = torch.nn.Parameter(torch.zeros((), device=model.device))
        self._model = [model]  # not a submodule: its weights are not ours to train or save
        self.label_ids = [yes_id, no_id]

    def llm_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = label_logits(self._model[0], hidden, self.label_ids)
        return logits[:, 0] - logits[:, 1]

    def forward(self, hidden: torch.Tensor, data: TrainSet, rows: torch.Tensor) -> torch.Tensor:
        fused = self.w * data.crm_logits[rows] + self.llm_logit(hidden) + self.b
        return torch.nn.functional.binary_cross_entropy_with_logits(fused, data.labels[rows])

    def fusion(self) -> Fusion:
        return Fusion(w_llm=1.0, w_crm=float(self.w.detach()), bias=float(self.b.detach()))


def micro_batches(rows: Sequence[int], lengths: Sequence[int], cfg: Batching) -> list[list[int]]:
    """One optimizer step's instances split into forwards: by token budget when packing with
    ``pack_tokens``, else ``batch_size`` instances each."""
    if cfg.packing and cfg.pack_tokens:
        return token_budget_groups(rows, lengths, cfg.pack_tokens)
    return [list(rows[i : i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]


def micro_batch_hidden(model, lora: PersonalizedLoRA, data: TrainSet, micro: list[int], packing: bool,
                       pad_id: int) -> torch.Tensor:
    """(len(micro), hidden) answer-position hidden states, each instance with its own user."""
    rows = torch.as_tensor(micro, device=data.reps.device)
    if packing:
        batch = pack([data.tokens[i] for i in micro])
        with lora.user(data.reps[rows], segments=batch.lengths):
            return packed_answer_hidden(model, batch)
    ids, mask, last = (t.to(model.device) for t in pad_right([data.tokens[i] for i in micro], pad_id))
    with lora.user(data.reps[rows]):
        return answer_hidden(model, ids, mask, last)


def accumulate_step(model, lora: PersonalizedLoRA, loss_fn: torch.nn.Module, data: TrainSet, rows: Sequence[int],
                    cfg: Batching, pad_id: int) -> tuple[float, int]:
    """Forward and backward of one optimizer step's instances (gradients accumulate, the loss is
    their mean); returns (summed instance loss, tokens)."""
    total, tokens = 0.0, 0
    lengths = data.lengths
    for micro in micro_batches(list(rows), lengths, cfg):
        hidden = micro_batch_hidden(model, lora, data, micro, cfg.packing, pad_id)
        loss = loss_fn(hidden, data, torch.as_tensor(micro, device=hidden.device)) * len(micro) / len(rows)
        loss.backward()
        total += float(loss.detach()) * len(rows)
        tokens += sum(lengths[i] for i in micro)
    return total, tokens
