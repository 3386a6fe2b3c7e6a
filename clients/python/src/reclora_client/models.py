"""Typed mirrors of the gateway's wire types.

Fields the gateway adds later are ignored rather than refused, so an older client keeps working
against a newer gateway; a field it drops or retypes fails loudly (``UnexpectedResponse``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CandidateScore(_Wire):
    item_id: int
    score: float = Field(description="The final P(like): made as the response's score_source says where "
                                     "llm_used, else the CRM's.")
    llm_score: float | None = Field(description="P('Yes') from the personalized LLM; None when degraded or when "
                                                "the version does not run its LLM (score_source 'crm').")
    crm_score: float = Field(description="P(like) from the conventional recommender.")
    llm_used: bool | None = Field(None, description="Whether the LLM's score went into score (None: a gateway "
                                                    "that does not say).")


class ScoreResponse(_Wire):
    """``POST /v1/score``: one score per candidate, in request order."""

    user_id: str
    model_version: str
    scores: list[CandidateScore]
    degraded: bool = Field(description="A stage was skipped or failed; see degraded_reasons.")
    degraded_reasons: list[str]
    cold_start: bool = Field(description="No stored history or profile was found for the user.")
    score_source: str | None = Field(None, description="How the answering version makes scores where the LLM ran: "
                                                       "'fused', 'llm' or 'crm' (the LLM never run); None: a "
                                                       "gateway that does not say.")
    timings: dict[str, float] = Field(description="Milliseconds per stage, and 'total'.")
    adapter: str | None = Field(None, description="The prototype adapter the LLM scored with (e.g. 'p17'); None: "
                                                  "the user's own adapter, no LLM score, or a gateway that does "
                                                  "not say.")

    def by_item(self) -> dict[int, CandidateScore]:
        """The scores keyed by item id, for callers that rank or join on ids."""
        return {s.item_id: s for s in self.scores}


class ReadBehaviour(_Wire):
    """A history behaviour a candidate's prompt read."""

    item_id: int
    title: str
    rating: float
    position: int = Field(description="Where it lies in the stored history, 0 = the oldest.")
    rank: int = Field(description="1 = the most similar to the candidate of the behaviours its prompt read.")
    similarity: float = Field(description="Inner product of its item embedding and the candidate's.")


class CandidateExplanation(_Wire):
    item_id: int
    title: str
    crm_score: float
    llm_score: float | None = Field(description="P('Yes') computed for the explanation, also where the version "
                                                "serves its CRM alone; None when not computed (llm_reason).")
    fused_score: float | None = Field(description="The version's fusion of the two; None without an LLM score "
                                                  "or fusion weights.")
    served_score: float = Field(description="What /v1/score serves for it when its LLM stage scores it.")
    prompt_tokens: int | None = Field(description="Tokens of its prompt: the shared prefix and its suffix.")
    history: list[ReadBehaviour]


class MetaWeight(_Wire):
    meta_lora: int
    weight: float


class GroupMixture(_Wire):
    group: str = Field(description="'all' (averaged over every module) or a layer ('layers.3').")
    modules: int
    top: list[MetaWeight] = Field(description="The heaviest meta-LoRAs, heaviest first.")


class GateMixture(_Wire):
    n_meta: int
    averaged: GroupMixture
    layers: list[GroupMixture]


class AdapterExplanation(_Wire):
    kind: str = Field(description="'meta_loras' (gates over meta-LoRAs) or 'single_lora'.")
    mixture: GateMixture | None = None
    temperature: float | None = None
    prototype: str | None = Field(None, description="The prototype adapter the version serves the user, if any.")
    prototype_mixture: GateMixture | None = None


class ExplainResponse(_Wire):
    """``POST /v1/explain``: each candidate's score taken apart (nothing served)."""

    user_id: str
    model_version: str
    score_source: str
    cold_start: bool
    history_length: int
    prompt_form: str | None
    prefix_tokens: int | None
    llm_computed: bool
    llm_reason: str | None = Field(description="Why the LLM scores are None: 'deadline', 'llm_overrun_expected', "
                                               "'llm_queue', 'llm_timeout', 'llm_error', 'no_llm', 'no_engine'.")
    deadline_ms: float
    adapter: AdapterExplanation | None
    candidates: list[CandidateExplanation]
    degraded_reasons: list[str]
    timings: dict[str, float]

    def by_item(self) -> dict[int, CandidateExplanation]:
        return {c.item_id: c for c in self.candidates}


class Event(_Wire):
    """One behaviour: a rating of an item at a Unix time in seconds."""

    item_id: int
    rating: float
    timestamp: int


class EventsResponse(_Wire):
    """``POST /v1/events``."""

    appended: int = Field(description="Events written (all of the request's).")
    history_length: int = Field(description="Behaviours stored for the user afterwards (capped).")


class ProfileResponse(_Wire):
    """``PUT /v1/users/{id}/profile``."""

    user_id: str
    fields: int = Field(description="Profile fields stored.")


class HistoryResponse(_Wire):
    """``GET /v1/users/{id}/history``: one page, newest first."""

    user_id: str
    events: list[Event]
    profile: dict[str, str]
    next_cursor: str | None = Field(description="Pass as ``cursor`` for the next (older) page; None at the end.")


class ErrorDetail(_Wire):
    """One problem of a refused request, e.g. ``loc='candidates[3]'``, ``type='unknown_item'``."""

    loc: str | None = None
    message: str
    type: str


class ErrorBody(_Wire):
    code: str
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)
    request_id: str | None = None


class ErrorResponse(_Wire):
    """The gateway's one error schema for every non-2xx answer."""

    error: ErrorBody
