"""What the scoring pipeline promises everyone else: the ``Scorer`` protocol, its result types,
the reasons an answer is degraded, and the one refusal it raises (unknown items).

The HTTP layer, the metrics and the docs all read these from here; the values of
``DegradedReason`` are the strings clients and dashboards see in ``degraded_reasons`` and in the
``reason`` label of ``reclora_degraded_responses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class DegradedReason(StrEnum):
    """Why an answer carries less than the full model (the CRM alone, or a cold-start user)."""

    HISTORY_UNAVAILABLE = "history_unavailable"  # Redis failed or exceeded its budget: scored as cold start
    DEADLINE = "deadline"  # too little time left for the LLM stage (under ``llm_min_ms``)
    LLM_OVERRUN_EXPECTED = "llm_overrun_expected"  # the engine's pace predicts the forward would overrun
    LLM_TIMEOUT = "llm_timeout"  # the forward was abandoned at the deadline
    LLM_ERROR = "llm_error"  # the engine failed


@dataclass
class CandidateResult:
    item_id: int
    score: float
    llm_score: float | None
    crm_score: float


@dataclass
class ScoreResult:
    user_id: str
    model_version: str
    candidates: list[CandidateResult]
    degraded: bool = False
    degraded_reasons: list[DegradedReason] = field(default_factory=list)
    cold_start: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)


class UnknownItems(ValueError):
    """Candidates the catalog of the version that would score them does not know; nothing was scored."""

    def __init__(self, items: Sequence[int], model_version: str) -> None:
        self.items = list(items)
        self.model_version = model_version
        super().__init__(f"{len(self.items)} item id(s) not in the catalog of model {model_version}")


class Scorer(Protocol):
    """What the HTTP layer needs from the model runtime."""

    @property
    def model_version(self) -> str:
        """The bundle version answering requests now."""
        ...

    def unknown_items(self, ids: Sequence[int]) -> list[int]:
        """The ids among ``ids`` that the active catalog does not know (empty when all are known)."""
        ...

    async def score(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None,
                    request_id: str = "") -> ScoreResult:
        """Score every candidate for the user within the deadline; degrade instead of raising.

        Raises ``UnknownItems`` (and scores nothing) when a candidate is not in the catalog of the
        version the request was given: the check and the scoring read one snapshot."""
        ...

    def close(self) -> None:
        """Release threads and engine connections (called once, at shutdown)."""
        ...
