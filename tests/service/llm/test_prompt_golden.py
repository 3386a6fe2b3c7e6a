"""The per-target prompt is the form every trained LoRA before the shared form read: its text and
tokens stay exactly as they were (digests of one request's prompts, recorded before the shared
form existed)."""

from __future__ import annotations

import hashlib
import json

import pytest
from transformers import AutoTokenizer

from service.llm.prompt import PROMPT_VERSION, Behaviour, ItemText, PromptBuilder, PromptConfig
from tests.tiny_llama import build_tiny_llama

HISTORIES = [
    [Behaviour(ItemText("Toy Story", 1995), 4.0), Behaviour(ItemText("Star Wars", 1977), 1.0)],
    [Behaviour(ItemText("Star Wars", 1977), 2.5)],
]
TARGETS = [ItemText("Fargo", 1996), ItemText("Heat", None)]
PROFILE = {"gender": "F", "age": 25, "occupation": "writer"}
GOLDEN_TEXT = "f35d0e9935f33b0599dc7d8397ac95f6e4c200d1887a6d2c27c67da987605918"
GOLDEN_IDS = "c36fc08beffe17cc49e66b479b5851f29f9c3e210e07097816119e3111a5fffd"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base"))


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def golden_request(builder: PromptBuilder) -> tuple[str, str]:
    texts = [builder.prefix_text(PROFILE)] + [builder.suffix_text(h, t) for h, t in zip(HISTORIES, TARGETS)]
    return digest(texts), digest(list(builder.encode(PROFILE, HISTORIES, TARGETS)))


def test_per_target_prompt_is_unchanged(tokenizer):
    config = PromptConfig()
    assert config.version == PROMPT_VERSION == "rella-chat-v1"
    assert golden_request(PromptBuilder(tokenizer, config)) == (GOLDEN_TEXT, GOLDEN_IDS)


def test_a_per_target_config_records_as_before():
    assert list(PromptConfig().record()) == ["version", "item_noun", "item_plural", "verb_past", "system", "yes", "no"]


def test_config_without_a_form_reads_as_per_target(tokenizer):
    config = PromptConfig.model_validate({"version": "rella-chat-v1", "item_noun": "movie"})
    assert golden_request(PromptBuilder(tokenizer, config)) == (GOLDEN_TEXT, GOLDEN_IDS)
