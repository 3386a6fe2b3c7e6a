"""Prompt encoding: cached line tokens must equal tokenizing each suffix whole, or not be used."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.llm.prompt import Behaviour, ItemText, PromptBuilder
from tiny_llama import build_tiny_llama

HISTORIES = [
    [Behaviour(ItemText("Toy Story", 1995), 4.0), Behaviour(ItemText("Star Wars", 1977), 1.0)],
    [Behaviour(ItemText("Star Wars", 1977), 2.5)],
]
TARGETS = [ItemText("Fargo", 1996), ItemText("Heat", None)]
PROFILE = {"gender": "F", "age": 25, "occupation": "writer"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base"))


class LineCountingTokenizer:
    """A real tokenizer whose ids start with the text's newline count: tokens then depend on the
    whole text, so encoding line by line gives other ids than encoding the suffix at once."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.chat_template = inner.chat_template
        self.unk_token_id = inner.unk_token_id

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, text, add_special_tokens=False):
        texts = [text] if isinstance(text, str) else text
        ids = [[t.count("\n")] + self.inner(t, add_special_tokens=False)["input_ids"] for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def whole(builder: PromptBuilder) -> list[list[int]]:
    return [builder.encode_text(builder.suffix_text(h, t)) for h, t in zip(HISTORIES, TARGETS)]


def test_cached_lines_equal_whole_suffixes(tokenizer):
    builder = PromptBuilder(tokenizer)
    assert builder.line_cache_enabled
    for _ in range(3):  # cold, then from the cache
        prefix, suffixes = builder.encode(PROFILE, HISTORIES, TARGETS)
        assert suffixes == whole(builder)
        assert prefix == builder.encode_text(builder.prefix_text(PROFILE))


def test_cache_off_where_lines_are_not_independent(tokenizer):
    builder = PromptBuilder(LineCountingTokenizer(tokenizer))
    assert not builder.line_cache_enabled
    assert builder.encode(PROFILE, HISTORIES, TARGETS)[1] == whole(builder)


def test_audit_switches_the_cache_off_on_a_difference(tokenizer):
    builder = PromptBuilder(LineCountingTokenizer(tokenizer))
    builder.line_cache_enabled = True  # as if the start-up probe had missed the difference
    _, suffixes = builder.encode(PROFILE, HISTORIES, TARGETS)  # the first request is audited
    assert suffixes == whole(builder)
    assert not builder.line_cache_enabled


def test_a_full_cache_evicts_oldest_lines_but_never_those_the_request_reads(tokenizer, monkeypatch):
    builder = PromptBuilder(tokenizer)
    builder.encode(PROFILE, HISTORIES, TARGETS)
    kept = set(builder._line_cache)
    monkeypatch.setattr("service.llm.prompt.LINE_CACHE_SIZE", len(kept))  # full: every new line evicts one
    other = [ItemText("Heat", 1995), ItemText("Casino", 1995)]
    prefix, suffixes = builder.encode({"gender": "M"}, HISTORIES, other)  # reuses lines, adds new ones
    assert suffixes == [builder.encode_text(builder.suffix_text(h, t)) for h, t in zip(HISTORIES, other)]
    assert prefix == builder.encode_text(builder.prefix_text({"gender": "M"}))
    assert len(builder._line_cache) == len(kept)
    assert kept - set(builder._line_cache)  # older lines made room
