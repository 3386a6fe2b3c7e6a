"""Wire types of ``POST /v1/score``.

Shape checks that need no configuration live here (types, int64 range, uniqueness, deadline
sign), each published in the schema; limits that come from settings (candidate count, longest
deadline) and the catalog check run in ``serving``. Both report in the same error schema. A user
id is a string or an int64 (``service.api.fields.UserId``).
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from service.api.fields import ItemId, UserId
from service.scoring.contracts import ScoreSource


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId
    candidates: list[ItemId] = Field(min_length=1, description="Distinct raw item ids to score.",
                                     examples=[[50, 172, 181]], json_schema_extra={"uniqueItems": True})
    deadline_ms: Annotated[int, Field(strict=True, gt=0)] | None = Field(
        None, description="Answer within this many ms (degraded if need be); null = the server default.")

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[int]) -> list[int]:
        dupes = [item for item, n in Counter(candidates).items() if n > 1]
        if dupes:
            raise PydanticCustomError("duplicate_items", "duplicate item ids: {ids}",
                                      {"ids": ", ".join(map(str, dupes))})
        return candidates


class CandidateScore(BaseModel):
    item_id: int
    score: float = Field(description="The final score: P(like), made as the response's score_source says where "
                                     "llm_used, else the CRM's.")
    llm_score: float | None = Field(description="P('Yes') from the personalized LLM; null when degraded or when "
                                                "the version does not run its LLM (score_source crm).")
    crm_score: float = Field(description="P(like) from the conventional recommender.")
    llm_used: bool = Field(description="True when the LLM's score went into this candidate's score; false when "
                                       "score is crm_score (degraded, or score_source crm).")


class ScoreResponse(BaseModel):
    user_id: str
    model_version: str
    scores: list[CandidateScore] = Field(description="One per candidate, in request order.")
    degraded: bool = Field(description="True when a stage was skipped or failed; see degraded_reasons.")
    degraded_reasons: list[str]
    cold_start: bool = Field(description="True when no stored history or profile was found for the user.")
    score_source: ScoreSource = Field(
        description="How the version that answered makes each score where the LLM ran (scores[].llm_used): "
                    "'fused' (the fusion of the LLM's and the CRM's scores), 'llm' (the LLM's score as it is: a "
                    "bundle without fusion weights) or 'crm' (the CRM's alone, the LLM never run: the bundle has "
                    "no LLM, its fusion did not beat the CRM on validation, or the gateway runs no LLM engine).")
    timings: dict[str, float] = Field(description="Milliseconds per stage, and 'total'.")
    adapter: str | None = Field(None, exclude_if=lambda value: value is None, description=(
        "The prototype adapter the LLM scored with (e.g. 'p17': the version serves a finite set of adapters, "
        "each user the one nearest to the user's own); absent when the user's own adapter was used or no "
        "candidate carries an LLM score: exact answers are the bytes they were."))

