"""Wire types of ``POST /v1/explain``.

The request is a score request's (``ScoreRequest``: the same shape checks, limits and catalog
check); the answer takes each candidate's score apart. Nothing in it is served.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.api.score.protocol import ScoreRequest
from service.scoring.contracts import ScoreSource


class ExplainRequest(ScoreRequest):
    """A score request to explain; ``deadline_ms`` null = the explain default (RECLORA_EXPLAIN_DEADLINE_MS)."""


class ReadBehaviourOut(BaseModel):
    item_id: int
    title: str
    rating: float
    position: int = Field(description="Where it lies in the stored history, 0 = the oldest.")
    rank: int = Field(description="1 = the most similar to the candidate of the behaviours this prompt read.")
    similarity: float = Field(description="Inner product of its item embedding and the candidate's (what "
                                          "retrieval ranks by).")


class CandidateExplanationOut(BaseModel):
    item_id: int
    title: str
    crm_score: float = Field(description="P(like) from the conventional recommender.")
    llm_score: float | None = Field(description="P('Yes') from the user's adapter, computed now, also where the "
                                                "version serves its CRM alone; null when not computed (llm_reason).")
    fused_score: float | None = Field(description="The version's fusion of llm_score and crm_score; null without "
                                                  "an LLM score or fusion weights.")
    served_score: float = Field(description="What /v1/score serves for this candidate when its LLM stage scores it "
                                            "(score_source decides: the fused score, the LLM's, or the CRM's).")
    prompt_tokens: int | None = Field(description="Tokens of this candidate's prompt: the shared prefix and its "
                                                  "suffix.")
    history: list[ReadBehaviourOut] = Field(description="The history behaviours its prompt read, in the prompt's "
                                                        "(time) order.")


class MetaWeightOut(BaseModel):
    meta_lora: int = Field(description="Index of the meta-LoRA in the version's banks.")
    weight: float


class GroupMixtureOut(BaseModel):
    group: str = Field(description="'all' (averaged over every module) or a layer ('layers.3').")
    modules: int = Field(description="Target modules whose gates are averaged here.")
    top: list[MetaWeightOut] = Field(description="The heaviest meta-LoRAs, heaviest first.")


class GateMixtureOut(BaseModel):
    n_meta: int
    averaged: GroupMixtureOut
    layers: list[GroupMixtureOut]


class AdapterOut(BaseModel):
    kind: str = Field(description="'meta_loras' (gates over meta-LoRAs) or 'single_lora' (one shared LoRA, no gate).")
    mixture: GateMixtureOut | None = Field(None, description="The user's own gate mixture.")
    temperature: float | None = None
    prototype: str | None = Field(None, description="The prototype adapter the version serves this user (it serves "
                                                    "prototypes), e.g. 'p3'; null where users get their own.")
    prototype_mixture: GateMixtureOut | None = Field(None, description="The served prototype's mixture (its centroid).")


class ExplainResponse(BaseModel):
    user_id: str
    model_version: str
    score_source: ScoreSource = Field(description="How /v1/score makes this version's scores (see ScoreResponse).")
    cold_start: bool
    history_length: int = Field(description="Stored behaviours the CRM and retrieval read.")
    prompt_form: str | None = Field(description="'per_target' or 'shared'; null without an LLM.")
    prefix_tokens: int | None = Field(description="Tokens of the prompt prefix every candidate shares.")
    llm_computed: bool
    llm_reason: str | None = Field(description="Why llm_score is null: 'deadline', 'llm_overrun_expected', "
                                               "'llm_queue', 'llm_timeout', 'llm_error', 'no_llm' or 'no_engine'.")
    deadline_ms: float
    adapter: AdapterOut | None = Field(description="The user's adapter; null for a version without an LLM.")
    candidates: list[CandidateExplanationOut] = Field(description="One per candidate, in request order.")
    degraded_reasons: list[str]
    timings: dict[str, float] = Field(description="Milliseconds per step, and 'total'.")
