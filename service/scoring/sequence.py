"""The one scoring sequence of a model version: CRM, retrieval and prompts, the user's adapter,
the engine, fusion, and which of them the version answers with.

``score_sequence`` runs it whole and synchronously: shadow scoring (a canary's candidate on the
engine thread) and the registry's smoke test (golden requests before activation) call it, so
both score exactly as the request pipeline does, which runs the same steps
(``service.scoring.stages``) with its deadline, score cache and fallbacks between them.
``Scored`` is what every path returns: the same three arrays the served-score log records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.base import Adapter, ScoringEngine
from service.llm.prompt import PromptBuilder
from service.model import LoadedModel
from service.model.fusion import ScoreSource
from service.personalization.adapter_cache import AdapterCache
from service.scoring.stages import (CRMResult, Prompts, UserHistoryView, answer_source, fuse, run_crm, text_inputs,
                                    user_adapter, with_collab_embeds)


@dataclass(frozen=True)
class Scored:
    """A version's scores for one request's candidates."""

    source: ScoreSource  # how the version makes ``final``
    crm: np.ndarray  # (C,) the CRM's P(click)
    llm: np.ndarray  # (C,) float64 P(Yes); NaN where a candidate has no LLM score
    final: np.ndarray  # (C,) float64, what is served

    @classmethod
    def of(cls, model: LoadedModel, source: ScoreSource, items: np.ndarray, crm: np.ndarray,
           llm: np.ndarray | None = None) -> "Scored":
        """The served scores of dense ``items`` by the one fusion rule (``stages.fuse``); no ``llm``:
        the CRM's alone."""
        llm = np.full(len(crm), np.nan) if llm is None else np.asarray(llm, np.float64)
        return cls(source, np.asarray(crm), llm, fuse(model, crm, llm, items))

    @property
    def has_llm(self) -> np.ndarray:
        return ~np.isnan(self.llm)


@dataclass(frozen=True)
class SequenceResult:
    """Everything the sequence computed, for callers that look past the scores."""

    scored: Scored
    crm: CRMResult
    prompts: Prompts | None = None  # None where the version answers with the CRM alone
    adapter: Adapter | None = None


def score_sequence(model: LoadedModel, builder: PromptBuilder | None, engine: ScoringEngine | None,
                   adapters: AdapterCache | None, user_id: str, history: UserHistoryView, candidates: Sequence[int],
                   interrupted: Callable[[], bool] | None = None) -> SequenceResult:
    """Score dense ``candidates`` for the user as ``model`` answers: the CRM alone where its
    answer source says so (no prompt, adapter or forward), else the LLM on every candidate and
    the fusion. The engine raises ``ForwardInterrupted`` when ``interrupted()`` turns true."""
    dense = np.asarray(candidates, np.int64)
    crm = run_crm(model, history, dense)
    source = answer_source(model, engine, builder)
    if source is ScoreSource.CRM:
        return SequenceResult(Scored.of(model, source, dense, crm.scores), crm)
    prompts = text_inputs(builder, model, history, dense)
    adapter = user_adapter(model, user_id, crm.user_rep, adapters, engine)
    prompts = with_collab_embeds(model, prompts, crm.user_rep, dense)
    llm = engine.score(adapter, prompts.prefix, prompts.suffixes, interrupted=interrupted, embeds=prompts.embeds)
    return SequenceResult(Scored.of(model, source, dense, crm.scores, llm), crm, prompts, adapter)
