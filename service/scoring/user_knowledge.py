"""A user's knowledge vector: which one a request serves, and how the nearline refresh makes one.

Serving: the stored record's vector when the version has knowledge and the record was made by
the version's encoder at its dimension; otherwise None, and the CRM uses its default vector. Why
(``KnowledgeOutcome``) and how old the served vector is go to the metrics.

Refreshing (``BaseLLMKnowledge``, the ``KnowledgeSource`` of ``service.nearline.knowledge_refresh``):
the version's user prompt over the stored history's catalog texts and ratings, greedy text from
the base LLM with no adapter installed, encoded by the version's encoder (loaded once, on first
use). The prompt words come from the version's knowledge config, so a refreshed vector is made
the way the offline ones it replaces were.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from service.history import KnowledgeRecord, UserHistory
from service.model import LoadedModel, ModelHolder
from service.nearline.knowledge_refresh import KnowledgeTarget

DEFAULT_MAX_NEW_TOKENS = 128


class KnowledgeOutcome(StrEnum):
    """Which user knowledge vector a request of a version with knowledge was scored with."""

    VECTOR = "vector"  # the user's stored vector
    DEFAULT_MISSING = "default_missing"  # none stored (or the history was unreadable): the CRM's default
    DEFAULT_MISMATCH = "default_mismatch"  # stored by another encoder or dimension: the default
    DEFAULT_MALFORMED = "default_malformed"  # stored but unreadable: the default


@dataclass(frozen=True)
class ServedKnowledge:
    vector: np.ndarray | None  # None: the CRM's default vector
    outcome: KnowledgeOutcome | None  # None: the version has no knowledge
    age_s: float | None = None  # of the served vector


def knowledge_target(model: LoadedModel) -> KnowledgeTarget | None:
    """The encoder whose vectors ``model`` reads; None without knowledge."""
    spec = model.knowledge
    return None if spec is None else KnowledgeTarget(spec.encoder, int(spec.dim))


def serve_knowledge(model: LoadedModel, record: KnowledgeRecord | None, error: str | None,
                    now: float | None = None) -> ServedKnowledge:
    """The vector a request of ``model`` reads for a user whose stored record is ``record``
    (``error``: why a stored record was unreadable)."""
    target = knowledge_target(model)
    if target is None:
        return ServedKnowledge(None, None)
    if record is None:
        return ServedKnowledge(None, KnowledgeOutcome.DEFAULT_MALFORMED if error else KnowledgeOutcome.DEFAULT_MISSING)
    if not target.made(record.stamp):
        return ServedKnowledge(None, KnowledgeOutcome.DEFAULT_MISMATCH)
    age = max((time.time() if now is None else now) - record.generated_at, 0.0)
    return ServedKnowledge(record.vector, KnowledgeOutcome.VECTOR, age)


class BaseLLMKnowledge:
    """The LLM side of the refresh over the serving version (``holder``) and the process's base
    LLM. ``base_model()`` lends the model with no adapter installed and no forward running on it;
    ``tokenizer()`` loads on first use (a tokenizer of its own: the prompt builder's serves
    requests on another thread), and so does the encoder."""

    def __init__(self, holder: ModelHolder, base_model: Callable[[], AbstractContextManager[Any]],
                 tokenizer: Callable[[], Any]) -> None:
        self.holder, self.base_model = holder, base_model
        self._load_tokenizer = tokenizer
        self._tokenizer = None
        self._encoders: dict[str, Any] = {}
        self._lock = threading.Lock()  # the tokenizer and encoders load once, whichever thread asks first

    def target(self) -> KnowledgeTarget | None:
        return knowledge_target(self.holder.snapshot().model)

    def prompt(self, model: LoadedModel, history: UserHistory) -> tuple[str, str]:
        """(system message, user prompt) of the stored user under ``model``'s knowledge prompts:
        profile and rated catalog texts, oldest first (items the catalog lacks left out)."""
        from service.knowledge.prompts import KnowledgePrompts

        prompts = KnowledgePrompts.model_validate(model.knowledge.prompts)
        dense = model.catalog.to_dense(history.items)
        texts = model.catalog.texts
        behaviours = [(texts[int(d)].render(), float(r)) for d, r in zip(dense, history.ratings) if d]
        rating_max = float(model.bundle.load_json("dataset.json").get("rating_max", 5.0))
        return prompts.system_message(), prompts.user_prompt(history.profile, behaviours, rating_max=rating_max)

    def generate(self, history: UserHistory, interrupted: Callable[[], bool]) -> str:
        from service.knowledge.generate import generate_greedy

        model = self.holder.snapshot().model
        if model.knowledge is None:
            raise ValueError(f"model {model.version} has no knowledge to refresh")
        system, prompt = self.prompt(model, history)
        tokenizer = self._tokenizer_once()
        with self.base_model() as llm:
            out = generate_greedy(llm, tokenizer, [prompt], system=system, batch_size=1, interrupted=interrupted,
                                  **model.knowledge.decoding(DEFAULT_MAX_NEW_TOKENS))
        return out[0].text

    def encode(self, text: str, target: KnowledgeTarget) -> np.ndarray:
        from service.knowledge.encode import BASE_LLM_MEAN, load_encoder

        if target.encoder == BASE_LLM_MEAN:  # the base LLM itself encodes: borrowed as for a forward
            tokenizer = self._tokenizer_once()
            with self.base_model() as llm:
                return np.asarray(load_encoder(BASE_LLM_MEAN, model=llm, tokenizer=tokenizer).encode([text]),
                                  dtype=np.float32)[0]
        with self._lock:
            encoder = self._encoders.get(target.encoder)
            if encoder is None:
                encoder = self._encoders[target.encoder] = load_encoder(target.encoder)
        return np.asarray(encoder.encode([text]), dtype=np.float32)[0]

    def _tokenizer_once(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._load_tokenizer()
            return self._tokenizer
