"""Test scaffolding for the HTTP layer (imported by conftest and the tests).

``FormulaScorer`` is a deterministic stand-in for the model runtime that implements the
``Scorer`` protocol (``FormulaExplainer``: the ``Explainer`` protocol), so these tests exercise
transport, validation and wiring without loading a model. It is never used by the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from service.llm.gate_mixture import gate_mixture
from service.scoring.contracts import (AdapterExplanation, CandidateExplanation, CandidateResult, DegradedReason,
                                       Explanation, ReadBehaviour, ScoreResult, ScoreSource, UnknownItems)
from service.history import HistoryStore
from service.scoring.pipeline import read_history
from tests.http_support import assert_error, serving  # noqa: F401  (re-exported for the tests)
from tests.redis_support import REDIS_URL  # noqa: F401  (re-exported for the tests)

DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
KNOWN_ITEMS = range(1, 101)


@dataclass
class FormulaScorer:
    """Scores from a fixed formula; items 1..100 are known. Reads history (when given) only to
    report ``cold_start``. Records each call so tests can check what the route passed on."""

    history: HistoryStore | None = None
    version: str = "formula-v1"
    degraded_reasons: list[str] = field(default_factory=list)
    fail: bool = False
    calls: list[dict] = field(default_factory=list)
    closed: bool = False

    @property
    def model_version(self) -> str:
        return self.version

    def unknown_items(self, ids: Sequence[int]) -> list[int]:
        return [i for i in ids if i not in KNOWN_ITEMS]

    @staticmethod
    def crm(item: int) -> float:
        return 0.05 + 0.9 * ((item * 37) % 100) / 100

    @staticmethod
    def llm(item: int) -> float:
        return 0.05 + 0.9 * ((item * 53) % 100) / 100

    async def score(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None,
                    request_id: str = "") -> ScoreResult:
        unknown = self.unknown_items(candidates)
        if unknown:  # checked before anything is scored, as the pipeline does
            raise UnknownItems(unknown, self.version)
        self.calls.append({"user_id": user_id, "candidates": list(candidates), "deadline_ms": deadline_ms,
                           "request_id": request_id})
        if self.fail:
            raise RuntimeError("secret internal detail: engine exploded")

        exists = False
        if self.history is not None:  # read as the pipeline reads it: a Redis error is a cold start, never a 500
            exists = (await read_history(self.history, user_id, budget_s=5.0))[0].exists
        degraded = bool(self.degraded_reasons)
        results = [CandidateResult(item_id=c, score=self.crm(c) if degraded else (self.crm(c) + self.llm(c)) / 2,
                                   llm_score=None if degraded else self.llm(c), crm_score=self.crm(c))
                   for c in candidates]
        return ScoreResult(user_id=user_id, model_version=self.version, candidates=results, degraded=degraded,
                           degraded_reasons=list(self.degraded_reasons), cold_start=not exists,
                           timings_ms={"history": 0.5, "crm": 1.25, "total": 2.0})

    def close(self) -> None:
        self.closed = True


@dataclass
class FormulaExplainer:
    """Explanations from a fixed formula (items 1..100 known); records each call."""

    calls: list[dict] = field(default_factory=list)

    async def explain(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None) -> Explanation:
        unknown = [c for c in candidates if c not in KNOWN_ITEMS]
        if unknown:
            raise UnknownItems(unknown, "formula-v1")
        self.calls.append({"user_id": user_id, "candidates": list(candidates), "deadline_ms": deadline_ms})
        mixture = gate_mixture(["model.layers.0.q_proj", "model.layers.1.q_proj"], [[0.6, 0.4], [0.3, 0.7]], 2)
        return Explanation(
            user_id=user_id, model_version="formula-v1", score_source=ScoreSource.CRM, cold_start=False,
            history_length=3, prompt_form="per_target", prefix_tokens=40,
            candidates=[CandidateExplanation(c, f"Item {c}", 0.5, None, None, 0.5, 90,
                                             (ReadBehaviour(7, "Item 7", 4.0, 2, 1, 0.9),)) for c in candidates],
            adapter=AdapterExplanation("meta_loras", mixture, 1.0), llm_computed=False,
            llm_reason=DegradedReason.LLM_TIMEOUT, deadline_ms=float(deadline_ms or 5000),
            degraded_reasons=[DegradedReason.LLM_TIMEOUT], timings_ms={"crm": 1.0, "total": 2.0})

    def close(self) -> None:
        pass
