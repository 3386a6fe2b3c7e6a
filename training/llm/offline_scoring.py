"""The offline P(Yes) scorer: a base model with an optional (personalized) LoRA scoring dataset samples.

Reports, the sweep, the export's fusion, the studies and training's own validation all score
through it, so a sample is worded and scored the same way wherever it is measured.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from service.llm.personalized_lora import PersonalizedLoRA
from service.llm.prompt import PromptBuilder, PromptConfig
from training.data.samples import PreparedData
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
                 prompt: PromptConfig | None = None) -> None:
        self.model, self.tokenizer, self.lora, self.k_text = model, tokenizer, lora, k_text
        self.prompt = prompt
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
        ctx = None
        if self.lora is not None:
            reps = None if user_reps is None else user_reps.to(self.model.device)
            ctx = lambda rows: self.lora.user(None if reps is None else reps[rows])  # noqa: E731
        self._eval()
        return score_sequences(self.model, prompts, self.builder.yes_id, self.builder.no_id, self.pad_id,
                               batch_size, rows_context=ctx).numpy()

    def score_requests(self, requests: list[RequestPrompt], user_reps: torch.Tensor | None,
                       token_budget: int = 8192) -> np.ndarray:
        """P(yes) of every candidate of the requests, in order; ``user_reps`` one row per request."""
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
