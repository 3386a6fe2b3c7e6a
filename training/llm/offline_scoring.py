"""The offline P(Yes) scorer: a base model with an optional (personalized) LoRA scoring dataset samples.

Reports, the sweep, the export's fusion, the studies and training's own validation all score
through it, so a sample is worded and scored the same way wherever it is measured.

Under torchrun (``ranks`` distributed) every rank is called with all the samples, scores its
share and returns everyone's scores gathered in the samples' order. Prompts are shared out in
whole batches of the single process's (length-sorted) batching, so each batch is the one a
single process would run and the scores are those a single process computes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from service.llm.collab_tokens import CollabProjector
from service.llm.personalized_lora import PersonalizedLoRA
from service.llm.prompt import PromptBuilder, PromptConfig
from training.data.samples import PreparedData
from training.distributed import Ranks
from training.llm.collab import collab_embeds, unit_vectors
from training.llm.prompts import RequestPrompt, View, prompt_config_for, request_prompts, sample_prompts
from training.llm.scoring import score_requests, score_sequences


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id; its end-of-sequence id (else 0) where it names none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


class LLMScorer:
    """Base model + optional (personalized) LoRA + prompt builder: scores dataset samples.

    ``prompt`` is the wording the LoRA was trained with; None words each dataset's prompts as its
    ``meta.json`` says (``prompt_config_for``).
    """

    def __init__(self, model, tokenizer, lora: PersonalizedLoRA | None, k_text: int,
                 prompt: PromptConfig | None = None, ranks: Ranks | None = None,
                 collab: CollabProjector | None = None) -> None:
        self.model, self.tokenizer, self.lora, self.k_text = model, tokenizer, lora, k_text
        self.prompt = prompt
        self.ranks = ranks or Ranks()  # the scoring passes' ranks (see the module docstring)
        self.collab = collab  # the collaborative tokens' projector, where the prompt has them
        self.builder = PromptBuilder(tokenizer, prompt or PromptConfig())
        self.pad_id = pad_id_of(tokenizer)

    def builder_for(self, data: PreparedData) -> PromptBuilder:
        """The builder of ``data``'s prompts (this scorer's own wording when it has one)."""
        config = self.prompt or prompt_config_for(data.meta)
        if config.version != self.builder.config.version:  # the version names the words
            self.builder = PromptBuilder(self.tokenizer, config)
        return self.builder

    def prompts(self, data: PreparedData, samples: pd.DataFrame, embeddings: np.ndarray, view: View) -> list[list[int]]:
        return sample_prompts(data, samples, self.builder_for(data), embeddings, self.k_text, view)

    def request_prompts(self, data: PreparedData, rows: pd.DataFrame, embeddings: np.ndarray,
                        view: View) -> list[RequestPrompt]:
        """The requests of ``rows`` (``training.llm.requests``) as the gateway prompts them."""
        return request_prompts(data, rows, self.builder_for(data), embeddings, self.k_text, view)

    def score(self, prompts: list[list[int]], user_reps: torch.Tensor | None, batch_size: int = 16,
              item_reps: torch.Tensor | None = None) -> np.ndarray:
        """P(yes) of every prompt, in order (each rank scores its share of whole batches);
        ``item_reps`` (one row per prompt: its candidate's CRM vector) with ``user_reps`` are what
        collaborative tokens read."""
        if self.ranks.distributed:  # score_sequences batches the prompts in length order: share that order's batches
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            batches = self.ranks.share((len(prompts) + batch_size - 1) // batch_size)
            mine = order[batches.start * batch_size : batches.stop * batch_size]
            local = self._score([prompts[i] for i in mine], None if user_reps is None else user_reps[mine], batch_size,
                                None if item_reps is None else item_reps[mine])
            probs = np.empty(len(prompts), dtype=local.dtype)
            probs[order] = self.ranks.gather(local)
            return probs
        return self._score(prompts, user_reps, batch_size, item_reps)

    def _score(self, prompts: list[list[int]], user_reps: torch.Tensor | None, batch_size: int,
               item_reps: torch.Tensor | None = None) -> np.ndarray:
        if not prompts:  # a rank whose share is empty (fewer batches than ranks)
            return np.zeros(0, np.float32)
        ctx = None
        if self.lora is not None:
            reps = None if user_reps is None else user_reps.to(self.model.device)
            ctx = lambda rows: self.lora.user(None if reps is None else reps[rows])  # noqa: E731
        self._eval()
        embeds = None
        if self._collab_on():
            def embeds(rows: list[int], ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
                return self._embeds(rows, ids, mask, user_reps, item_reps, [1] * len(rows), rows)
        return score_sequences(self.model, prompts, self.builder.yes_id, self.builder.no_id, self.pad_id,
                               batch_size, rows_context=ctx, embeds=embeds).numpy()

    def score_requests(self, requests: list[RequestPrompt], user_reps: torch.Tensor | None,
                       token_budget: int = 8192, item_reps: torch.Tensor | None = None) -> np.ndarray:
        """P(yes) of every candidate of the requests, in order; ``user_reps`` one row per request,
        ``item_reps`` one per candidate (collaborative tokens). Distributed, each rank scores a
        contiguous share of the requests (packed by the token budget within its share, so a score
        may differ from one process's in the last bits)."""
        if self.ranks.distributed:
            rows = self.ranks.share(len(requests))
            first = sum(len(r.suffixes) for r in requests[: rows.start])
            count = sum(len(r.suffixes) for r in requests[rows])
            local = self._score_requests(requests[rows], None if user_reps is None else user_reps[rows], token_budget,
                                         None if item_reps is None else item_reps[first : first + count])
            return self.ranks.gather(local).astype(local.dtype)
        return self._score_requests(requests, user_reps, token_budget, item_reps)

    def _score_requests(self, requests: list[RequestPrompt], user_reps: torch.Tensor | None,
                        token_budget: int, item_reps: torch.Tensor | None = None) -> np.ndarray:
        if not requests:
            return np.zeros(0, np.float32)
        ctx = None
        if self.lora is not None:
            reps = None if user_reps is None else user_reps.to(self.model.device)
            ctx = lambda rows, segments: self.lora.user(  # noqa: E731
                None if reps is None else reps[rows], segments=None if reps is None else segments)
        self._eval()
        embeds = None
        if self._collab_on():
            counts = [len(r.suffixes) for r in requests]
            firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)

            def embeds(rows: list[int], ids: torch.Tensor, mask: None) -> torch.Tensor:
                items = [i for r in rows for i in range(firsts[r], firsts[r] + counts[r])]
                return self._embeds(rows, ids, mask, user_reps, item_reps, [counts[r] for r in rows], items)
        return score_requests(self.model, [(r.prefix, r.suffixes) for r in requests], self.builder.yes_id,
                              self.builder.no_id, token_budget, rows_context=ctx, embeds=embeds).numpy()

    def _collab_on(self) -> bool:
        if self.builder.collab_id is None:
            return False
        if self.collab is None:
            raise ValueError("the prompt has collaborative tokens but the scorer has no projector")
        return True

    def _embeds(self, rows: list[int], ids: torch.Tensor, mask: torch.Tensor | None, user_reps: torch.Tensor | None,
                item_reps: torch.Tensor | None, counts: list[int], items: list[int]) -> torch.Tensor:
        """A batch's input embeddings with its collaborative tokens in place."""
        if user_reps is None or item_reps is None:
            raise ValueError("collaborative tokens need the CRM's user and item vectors")
        device = self.model.device
        vectors = unit_vectors(self.collab, user_reps.to(device)[rows], item_reps.to(device)[items], counts)
        return collab_embeds(self.model, ids, self.builder.collab_id, vectors, mask)

    def _eval(self) -> None:
        self.model.eval()
        if self.collab is not None:
            self.collab.eval()
        if self.lora is not None:
            self.lora.eval()
