"""Shadow scoring: a canary's candidate scores a request it does not answer, as a background job.

The job runs on the engine scheduler's thread (``EngineScheduler.submit_background``): only when
no request waits for the engine, yielding it between layers when one arrives. It scores the same
history the request read, with the candidate's own catalog, CRM, adapters, prompt config and
fusion; the caller records the scores with a shadow flag, never serves them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.base import ScoringEngine
from service.history import KnowledgeRecord
from service.llm.prompt import PromptBuilder
from service.model import ModelSnapshot
from service.personalization.adapter_cache import AdapterCache
from service.scoring.sequence import Scored, score_sequence
from service.scoring.stages import UserHistoryView
from service.scoring.user_knowledge import serve_knowledge


@dataclass(frozen=True)
class StoredHistory:
    """What a request read of the user's history, in raw ids, for its shadow to score the same."""

    items: np.ndarray
    ratings: np.ndarray
    profile: Mapping[str, str]
    knowledge: KnowledgeRecord | None = None  # the user's stored knowledge vector record


class ShadowBuilders:
    """A prompt builder per candidate version for the engine thread alone (a builder's token
    cache is not shared between threads; the candidate's own builder serves its live requests)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._builders: dict[str, PromptBuilder] = {}

    def of(self, snapshot: ModelSnapshot) -> PromptBuilder | None:
        if snapshot.builder is None:
            return None
        builder = self._builders.get(snapshot.version)
        if builder is None:
            builder = PromptBuilder(snapshot.builder.tokenizer, snapshot.model.prompt)
            self._builders[snapshot.version] = builder
            while len(self._builders) > self.keep:
                self._builders.pop(next(iter(self._builders)))
        return builder


def shadow_score(snapshot: ModelSnapshot, builder: PromptBuilder | None, engine: ScoringEngine | None,
                 adapters: AdapterCache, user_id: str, stored: StoredHistory, candidates: Sequence[int],
                 interrupted: Callable[[], bool]) -> Scored | None:
    """Every candidate scored by ``snapshot``'s version through the one scoring sequence; None
    when its catalog lacks one of them. The engine raises ``ForwardInterrupted`` when a request
    arrives (the scheduler queues the job again)."""
    model = snapshot.model
    if model.catalog.unknown(candidates):
        return None
    view = UserHistoryView.from_raw(model, stored.items, stored.ratings, stored.profile,
                                    serve_knowledge(model, stored.knowledge, None).vector)  # as the candidate serves it
    return score_sequence(model, builder, engine, adapters, user_id, view, model.catalog.to_dense(candidates),
                          interrupted).scored
