"""Wire types of the vLLM OpenAI-compatible server routes the engine uses (checked on vLLM 0.32).

Only the fields the engine sends or reads are modelled; responses ignore unknown fields so a
newer server that adds fields keeps working.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerativeScoringRequest(BaseModel):
    """POST /generative_scoring: P(label_token_ids[0]) after query + item, for every item.

    Token ids (not text) for query and items: the gateway tokenizes once, so every engine
    scores exactly the same tokens, and the server's prefix cache keys on the shared query.
    """

    model: str
    query: list[int]
    items: list[list[int]]
    label_token_ids: list[int]
    apply_softmax: bool = True  # normalize over the label tokens only: softmax([yes, no])[0]


class GenerativeScoringItem(_Response):
    index: int
    score: float


class GenerativeScoringResponse(_Response):
    model: str = ""
    data: list[GenerativeScoringItem]

    def scores(self, n: int) -> list[float]:
        """The scores in item order; raises ValueError when the answer does not cover the items."""
        out: list[float | None] = [None] * n
        for item in self.data:
            if not 0 <= item.index < n:
                raise ValueError(f"generative_scoring answered index {item.index} for {n} items")
            out[item.index] = item.score
        if any(s is None for s in out):
            raise ValueError(f"generative_scoring answered {len(self.data)} of {n} items")
        return out  # type: ignore[return-value]


class CompletionRequest(BaseModel):
    """POST /v1/completions, one choice per prompt, for servers without /generative_scoring.

    ``allowed_token_ids`` restricts the answer to the labels; with the server started with
    ``--logprobs-mode processed_logprobs`` the returned logprobs are then normalized over them.
    """

    model: str
    prompt: list[list[int]]
    max_tokens: int = 1
    temperature: float = 0.0
    logprobs: int
    allowed_token_ids: list[int]
    return_tokens_as_token_ids: bool = True  # top_logprobs keyed "token_id:<id>", not by text


class CompletionLogprobs(_Response):
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Response):
    choices: list[CompletionChoice]

    def label_probability(self, n: int, label_ids: list[int]) -> list[float]:
        """softmax over the label logprobs at the first answer position, first label, per prompt."""
        keys = [f"token_id:{t}" for t in label_ids]
        out: list[float | None] = [None] * n
        for choice in self.choices:
            top = choice.logprobs.top_logprobs[0] if choice.logprobs and choice.logprobs.top_logprobs else None
            if top is None or any(k not in top for k in keys):
                raise ValueError("completion logprobs lack a label token: start the server with "
                                 "--logprobs-mode processed_logprobs")
            values = [top[k] for k in keys]
            peak = max(values)
            weights = [math.exp(v - peak) for v in values]
            if not 0 <= choice.index < n:
                raise ValueError(f"completions answered index {choice.index} for {n} prompts")
            out[choice.index] = weights[0] / sum(weights)
        if any(s is None for s in out):
            raise ValueError(f"completions answered {len(self.choices)} of {n} prompts")
        return out  # type: ignore[return-value]


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (server run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).

    ``load_inplace`` makes a repeated load of a name succeed instead of answering 400: names are
    content-addressed, so a name already present holds the same weights, and the repeat only
    refreshes the path (another gateway may have written it, or the server may have restarted).
    """

    lora_name: str
    lora_path: str
    load_inplace: bool = True


class UnloadAdapterRequest(BaseModel):
    lora_name: str


class ModelCard(_Response):
    id: str
    root: str | None = None
    parent: str | None = None


class ModelList(_Response):
    data: list[ModelCard]

    def base_model(self) -> str:
        """The served base model's name (the card that is not a LoRA adapter)."""
        for card in self.data:
            if card.parent is None:
                return card.id
        raise ValueError("the server lists no base model")

    def adapters(self) -> list[str]:
        return [card.id for card in self.data if card.parent is not None]
