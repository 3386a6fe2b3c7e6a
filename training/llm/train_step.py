"""One optimizer step of LLM training: the instances, the two objectives, and the micro-batches.

Micro-batches are packed by default (``training.llm.packing``: one padding-free row per
micro-batch, attention kept within each instance); ``packing=False`` runs right-padded rows
instead. A step covers ``batch_size * grad_accum`` instances either way; ``pack_tokens`` only
changes how a step's instances are split into forwards.

The unit a run shuffles and batches is a prompt, or a request (``TrainSet.build_requests``): one
prefix and several candidates' suffixes, each candidate an instance with its own label, the
prefix computed once for all of them. Steps and micro-batches then hold whole requests
(``UnitBatching``); the loss is still the mean over a step's instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from service.llm.personalized_lora import PersonalizedLoRA
from service.model.fusion import Fusion
from training.llm.collab import CollabInputs, collab_embeds, unit_vectors
from training.llm.packing import PackedBatch, pack, pack_requests, packed_answer_hidden, token_budget_groups
from training.llm.prompts import RequestPrompt
from training.llm.scoring import answer_hidden, label_logits, pad_right


class Batching(Protocol):
    """How a step's instances are split into forwards (``LLMTrainConfig`` has these fields)."""

    packing: bool
    pack_tokens: int  # a packed micro-batch's token budget; 0: batch_size instances each
    batch_size: int


@dataclass(frozen=True)
class UnitBatching:
    """``Batching`` in units (prompts or requests) rather than instances."""

    packing: bool
    pack_tokens: int
    batch_size: int


@dataclass
class TrainSet:
    """Training units (prompts, or requests of several candidates), tokenized once per run, with
    what the objectives need of each instance. Indexing is by unit; ``instances(units)`` gives
    their instances in order."""

    tokens: list[torch.Tensor]  # (L_i,) token ids of each unit (a request's prefix, then its suffixes), on the device
    reps: torch.Tensor  # (units, user_dim) frozen CRM user vectors
    labels: torch.Tensor  # (N,) 1.0 / 0.0, per instance
    answers: torch.Tensor  # (N,) the answer token: yes_id or no_id
    crm_logits: torch.Tensor | None = None  # (N,) the frozen CRM's logits (fused objective)
    suffixes: list[tuple[int, ...]] | None = None  # per unit, its suffixes' token counts (requests only)
    starts: list[int] | None = None  # per unit, its first instance (requests only)
    collab: CollabInputs | None = None  # collaborative tokens (``training.llm.collab``); None: none

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], reps: torch.Tensor, labels: Sequence[int], yes_id: int,
              no_id: int, device: torch.device, crm_logits: torch.Tensor | None = None) -> "TrainSet":
        """One unit per prompt, each one instance."""
        y = torch.as_tensor(np.asarray(labels, dtype=np.float32), device=device)
        return cls(tokens=[torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts], reps=reps.to(device),
                   labels=y, answers=torch.where(y > 0, yes_id, no_id).long(),
                   crm_logits=None if crm_logits is None else crm_logits.to(device))

    @classmethod
    def build_requests(cls, requests: Sequence[RequestPrompt], reps: torch.Tensor, labels: Sequence[int],
                       yes_id: int, no_id: int, device: torch.device,
                       crm_logits: torch.Tensor | None = None) -> "TrainSet":
        """One unit per request (``reps`` one row each), an instance per suffix (``labels`` and
        ``crm_logits`` in the requests' suffix order)."""
        units = cls.build([r.prefix + [t for s in r.suffixes for t in s] for r in requests], reps, labels, yes_id,
                          no_id, device, crm_logits)
        units.suffixes = [tuple(len(s) for s in r.suffixes) for r in requests]
        counts = [len(s) for s in units.suffixes]
        if sum(counts) != len(units.labels):
            raise ValueError(f"{sum(counts)} suffixes but {len(units.labels)} labels")
        units.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        return units

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_instances(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        return [int(t.numel()) for t in self.tokens]

    def instances(self, units: Sequence[int]) -> list[int]:
        """The instances of ``units``, in order."""
        if self.suffixes is None:
            return list(units)
        return [i for u in units for i in range(self.starts[u], self.starts[u] + len(self.suffixes[u]))]

    def packed(self, units: Sequence[int]) -> PackedBatch:
        """The units as one packed row."""
        if self.suffixes is None:
            return pack([self.tokens[i] for i in units])
        requests = []
        for u in units:
            prefix, rest = self.tokens[u].split([self.tokens[u].numel() - sum(self.suffixes[u]), sum(self.suffixes[u])])
            requests.append((prefix, list(rest.split(list(self.suffixes[u])))))
        return pack_requests(requests)

    def batching(self, cfg: "Batching") -> "Batching":
        """``cfg`` in units: a request counts as its share of instances, so a micro-batch (and a
        step, ``units_per``) holds about as many instances as with single prompts."""
        return cfg if self.suffixes is None else UnitBatching(cfg.packing, cfg.pack_tokens,
                                                             self.units_per(cfg.batch_size))

    def units_per(self, instances: int) -> int:
        """Whole units holding about ``instances`` instances (at least one)."""
        return instances if self.suffixes is None else max(1, round(instances * len(self) / self.n_instances))


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
    """(instances of micro, hidden) answer-position hidden states, each unit with its own user."""
    rows = torch.as_tensor(micro, device=data.reps.device)
    if packing:
        batch = data.packed(micro)
        embeds = None if data.collab is None else _collab_embeds(model, data, micro, batch.ids)
        with lora.user(data.reps[rows], segments=batch.lengths):
            return packed_answer_hidden(model, batch, embeds)
    if data.suffixes is not None:
        raise ValueError("requests of several candidates train packed only")
    ids, mask, last = (t.to(model.device) for t in pad_right([data.tokens[i] for i in micro], pad_id))
    embeds = None if data.collab is None else _collab_embeds(model, data, micro, ids, mask)
    with lora.user(data.reps[rows]):
        return answer_hidden(model, ids, mask, last, embeds)


def _collab_embeds(model, data: TrainSet, micro: list[int], ids: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The micro-batch's input embeddings with its units' collaborative tokens in place."""
    collab = data.collab
    instances = torch.as_tensor(data.instances(micro), device=collab.items.device)
    counts = [1] * len(micro) if data.suffixes is None else [len(data.suffixes[u]) for u in micro]
    vectors = unit_vectors(collab.projector, data.reps[torch.as_tensor(micro, device=data.reps.device)],
                           collab.items[instances], counts)
    return collab_embeds(model, ids, collab.placeholder, vectors, mask)


def accumulate_step(model, lora: PersonalizedLoRA, loss_fn: torch.nn.Module, data: TrainSet, rows: Sequence[int],
                    cfg: Batching, pad_id: int, n_instances: int | None = None) -> tuple[float, int]:
    """Forward and backward of one optimizer step's units (gradients accumulate, the loss is the
    mean over their instances); returns (summed instance loss, tokens).

    A rank of a distributed run passes its share of the step as ``rows`` and the whole step's
    instance count as ``n_instances``: its gradients are then its share of the step's mean, and
    their sum over the ranks is the single-process step's gradient."""
    total, tokens = 0.0, 0
    lengths = data.lengths
    n_instances = len(data.instances(rows)) if n_instances is None else n_instances
    for micro in micro_batches(list(rows), lengths, data.batching(cfg)):
        hidden = micro_batch_hidden(model, lora, data, micro, cfg.packing, pad_id)
        instances = data.instances(micro)
        loss = loss_fn(hidden, data, torch.as_tensor(instances, device=hidden.device)) * len(instances) / n_instances
        loss.backward()
        total += float(loss.detach()) * n_instances
        tokens += sum(lengths[i] for i in micro)
    return total, tokens
