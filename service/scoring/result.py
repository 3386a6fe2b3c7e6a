"""What the scoring pipeline returns; the HTTP layer maps it to the wire schema."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    degraded_reasons: list[str] = field(default_factory=list)
    cold_start: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
