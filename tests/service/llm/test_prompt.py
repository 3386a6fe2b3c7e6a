"""Prompt encoding: cached line tokens must equal tokenizing each suffix whole, or not be used."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.llm.prompt import Behaviour, ItemText, PromptBuilder
from tests.tiny_llama import build_tiny_llama

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


# ---- the prompt's words come from its config; the version follows them -----------------------------

# The text of PROMPT_VERSION "rella-chat-v1" as bundles were trained on it: the default words must keep it.
MOVIE_PREFIX = (
    "<|im_start|>system\nYou are a recommender system. You answer only Yes or No.<|im_end|>\n<|im_start|>user\n"
    "The user is F. The user's age is 25. The user's job is writer.\n"
    "Note that the more stars the user rated a movie, the more the user liked it. You should ONLY tell me yes "
    "or no.\nThe user watched the following movies in order in the past, and rated them:\n")
MOVIE_SUFFIX = ("1. Toy Story (1995) (4 stars)\n2. Star Wars (1977) (1 star)\n"
                "Based on the movies the user has watched, deduce if the user will like the movie ***Fargo (1996)***."
                "<|im_end|>\n<|im_start|>assistant\n")
OLD_BUNDLE_CONFIG = {"version": "rella-chat-v1", "item_noun": "movie", "verb_past": "watched",
                     "system": "You are a recommender system. You answer only Yes or No.", "yes": "Yes", "no": "No"}


def test_default_words_keep_the_original_prompt_and_version(tokenizer):
    from service.llm.prompt import PROMPT_VERSION, PromptConfig

    old = PromptConfig.model_validate(OLD_BUNDLE_CONFIG)  # a bundle's prompt/config.json before item_plural
    assert old.version == PromptConfig().version == PROMPT_VERSION == "rella-chat-v1"
    for config in (PromptConfig(), old, PromptConfig(item_noun="movie", item_plural="movies")):
        builder = PromptBuilder(tokenizer, config)
        assert builder.prefix_text(PROFILE) == MOVIE_PREFIX
        assert builder.suffix_text(HISTORIES[0], TARGETS[0]) == MOVIE_SUFFIX
        assert builder.encode(PROFILE, HISTORIES[:1], TARGETS[:1]) == (
            tokenizer(MOVIE_PREFIX, add_special_tokens=False)["input_ids"],
            [tokenizer(MOVIE_SUFFIX, add_special_tokens=False)["input_ids"]])
    assert "The user has not rated any movies yet.\n" in PromptBuilder(tokenizer, old).prefix_text(PROFILE, False)


def test_the_version_follows_the_words(tokenizer):
    from service.llm.prompt import PromptConfig

    book = PromptConfig(item_noun="book", verb_past="read")
    assert book.version == PromptConfig(item_noun="book", verb_past="read").version  # the same words
    assert book.version.startswith("rella-chat-v1+") and book.version != PromptConfig().version
    others = (PromptConfig(item_noun="book"), PromptConfig(item_noun="novel", verb_past="read"),
              PromptConfig(item_noun="book", verb_past="read", item_plural="bookz"),
              PromptConfig(system="You rank items."), PromptConfig(yes="Yes", no="Nope"))
    versions = {c.version for c in (book, *others)}
    assert len(versions) == 6 and PromptConfig().version not in versions
    assert PromptConfig.model_validate(book.model_dump()) == book  # the bundle round trip
    with pytest.raises(ValueError, match="does not match its words"):
        PromptConfig.model_validate({**book.model_dump(), "item_noun": "movie"})
    with pytest.raises(ValueError, match="does not match its words"):
        PromptConfig.model_validate({**OLD_BUNDLE_CONFIG, "item_noun": "book"})


def test_book_prompts_say_book_and_never_movie(tokenizer):
    from service.llm.prompt import PromptConfig

    builder = PromptBuilder(tokenizer, PromptConfig(item_noun="book", verb_past="read"))
    text = builder.prefix_text(PROFILE) + builder.suffix_text(HISTORIES[0], TARGETS[0])
    assert "the user rated a book," in text and "The user read the following books in order" in text
    assert "Based on the books the user has read, deduce if the user will like the book ***Fargo (1996)***." in text
    assert "movie" not in text.lower() and "watched" not in text
    assert "any books yet" in builder.prefix_text(PROFILE, False)
    item = PromptBuilder(tokenizer, PromptConfig(item_noun="item", verb_past="interacted with"))
    assert "the user rated an item," in item.prefix_text(PROFILE)
    series = PromptBuilder(tokenizer, PromptConfig(item_noun="series", item_plural="series"))
    assert "the following series in order" in series.prefix_text(PROFILE)
