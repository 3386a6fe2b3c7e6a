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

from service.llm.personalized_lora import PersonalizedLoRA
from service.llm.prompt import PromptBuilder, PromptConfig
from training.data.samples import PreparedData
from training.distributed import Ranks
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
                 prompt: PromptConfig | None = None, ranks: Ranks | None = None) -> None:
        self.model, self.tokenizer, self.lora, self.k_text = model, tokenizer, lora, k_text
        self.prompt = prompt
        self.ranks = ranks or Ranks()  # the scoring passes' ranks (see the module docstring)
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

    def score(self, prompts: list[list[int]], user_reps: torch.Tensor | None, batch_size: int = 16) -> np.ndarray:
        """P(yes) of every prompt, in order (each rank scores its share of whole batches)."""
        if self.ranks.distributed:  # score_sequences batches the prompts in length order: share that order's batches
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            batches = self.ranks.share((len(prompts) + batch_size - 1) // batch_size)
            mine = order[batches.start * batch_size : batches.stop * batch_size]
            local = self._score([prompts[i] for i in mine], None if user_reps is None else user_reps[mine], batch_size)
            probs = np.empty(len(prompts), dtype=local.dtype)
            probs[order] = self.ranks.gather(local)
            return probs
        return self._score(prompts, user_reps, batch_size)

    def _score(self, prompts: list[list[int]], user_reps: torch.Tensor | None, batch_size: int) -> np.ndarray:
        if not prompts:  # a rank whose share is empty (fewer batches than ranks)
            return np.zeros(0, np.float32)
        ctx = None
        if self.lora is not None:
            reps = None if user_reps is None else user_reps.to(self.model.device)
            ctx = lambda rows: self.lora.user(None if reps is None else reps[rows])  # noqa: E731
        self._eval()
        return score_sequences(self.model, prompts, self.builder.yes_id, self.builder.no_id, self.pad_id,
                               batch_size, rows_context=ctx).numpy()

    def score_requests(self, requests: list[RequestPrompt], user_reps: torch.Tensor | None,
                       token_budget: int = 8192) -> np.ndarray:
        """P(yes) of every candidate of the requests, in order; ``user_reps`` one row per request.
        Distributed, each rank scores a contiguous share of the requests (packed by the token
        budget within its share, so a score may differ from one process's in the last bits)."""
        if self.ranks.distributed:
            rows = self.ranks.share(len(requests))
            local = self._score_requests(requests[rows], None if user_reps is None else user_reps[rows], token_budget)
            return self.ranks.gather(local).astype(local.dtype)
        return self._score_requests(requests, user_reps, token_budget)

    def _score_requests(self, requests: list[RequestPrompt], user_reps: torch.Tensor | None,
                        token_budget: int) -> np.ndarray:
        if not requests:
            return np.zeros(0, np.float32)
        ctx = None
        if self.lora is not None:
            reps = None if user_reps is None else user_reps.to(self.model.device)
            ctx = lambda rows, segments: self.lora.user(  # noqa: E731
                None if reps is None else reps[rows], segments=None if reps is None else segments)
        self._eval()
        return score_requests(self.model, [(r.prefix, r.suffixes) for r in requests], self.builder.yes_id,
                              self.builder.no_id, token_budget, rows_context=ctx).numpy()

    def _eval(self) -> None:
        self.model.eval()
        if self.lora is not None:
            self.lora.eval()
