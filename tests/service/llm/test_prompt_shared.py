"""The shared-history prompt form: one history in the prefix, short per-candidate suffixes, a
version of its own."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.llm.prompt import (PROMPT_VERSION, SHARED_PROMPT_VERSION, Behaviour, ItemText, PromptBuilder,
                                PromptConfig, PromptFormMismatch, check_trained_form, form_of_version)
from tests.service.llm.test_prompt import LineCountingTokenizer
from tests.tiny_llama import build_tiny_llama

HISTORY = [Behaviour(ItemText("Toy Story", 1995), 4.0), Behaviour(ItemText("Star Wars", 1977), 1.0),
           Behaviour(ItemText("Se7en (a.k.a. Seven)", 1995), 2.5)]
TARGETS = [ItemText("Fargo", 1996), ItemText("Heat", None), ItemText("Star Wars", 1977)]
PROFILE = {"gender": "F", "age": 25, "occupation": "writer"}
SHARED = PromptConfig(form="shared")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base"))


def test_the_version_names_the_form() -> None:
    assert PromptConfig().version == PROMPT_VERSION and SHARED.version == SHARED_PROMPT_VERSION
    books = PromptConfig(item_noun="book", verb_past="read")
    shared_books = PromptConfig(item_noun="book", verb_past="read", form="shared")
    assert shared_books.version.startswith(SHARED_PROMPT_VERSION + "+")
    assert shared_books.version.split("+")[1] == books.version.split("+")[1]  # the same words
    assert [form_of_version(c.version) for c in (books, shared_books)] == ["per_target", "shared"]
    with pytest.raises(ValueError, match="does not match"):
        PromptConfig.model_validate({"version": PROMPT_VERSION, "form": "shared"})
    assert PromptConfig.model_validate(SHARED.record()) == SHARED and SHARED.record()["form"] == "shared"
    assert "form" not in PromptConfig().record()  # a per-target config's file is as before the field


def test_a_lora_of_one_form_refuses_the_other() -> None:
    check_trained_form(SHARED, "shared")
    with pytest.raises(PromptFormMismatch, match="'per_target' prompt form"):
        check_trained_form(SHARED, "per_target")


def test_every_candidate_shares_the_prefix_with_the_history(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, SHARED)
    prefix, suffixes = builder.encode_shared(PROFILE, HISTORY, TARGETS)
    text = tokenizer.decode(prefix)
    assert "Toy Story (1995) (4 stars)" in text and "(2.5 stars)" in text and "The user is F." in text
    assert len(suffixes) == len(TARGETS)
    per_target = PromptBuilder(tokenizer)
    history = per_target.encode_text("".join(builder.history_lines(HISTORY)))
    for target, suffix in zip(TARGETS, suffixes):
        assert suffix == builder.encode_text(builder.question(target))  # the question alone, no history
        assert len(suffix) + len(history) <= len(per_target.encode_text(per_target.suffix_text(HISTORY, target))) + 2
        assert "Toy Story" not in tokenizer.decode(suffix)
    # the per-target form's pieces in another place: the history ends the prefix
    assert prefix == per_target.encode_text(per_target.prefix_text(PROFILE)) + history


def test_cached_pieces_equal_whole_texts(tokenizer) -> None:
    cached = PromptBuilder(tokenizer, SHARED)
    assert cached.line_cache_enabled
    whole = PromptBuilder(LineCountingTokenizer(tokenizer), SHARED)
    assert not whole.line_cache_enabled
    for _ in range(2):  # cold, then from the cache
        prefix, suffixes = cached.encode_shared(PROFILE, HISTORY, TARGETS)
        assert prefix == cached.encode_text(cached.prefix_text(PROFILE)) + cached.encode_text(
            "".join(cached.history_lines(HISTORY)))
        assert suffixes == [cached.encode_text(cached.question(t)) for t in TARGETS]
    prefix, suffixes = whole.encode_shared(PROFILE, HISTORY, TARGETS)
    assert suffixes == [whole.encode_text(whole.question(t)) for t in TARGETS]


def test_without_a_history_the_prefix_says_so(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, SHARED)
    prefix, suffixes = builder.encode_shared(PROFILE, [], TARGETS[:1])
    assert "not rated any movies yet" in tokenizer.decode(prefix) and len(suffixes) == 1


def test_a_cache_that_disagrees_with_whole_texts_is_switched_off(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, SHARED)
    builder.encode_shared(PROFILE, HISTORY, TARGETS)  # fills the cache (and audits)
    line = builder.history_lines(HISTORY)[1]
    builder._line_cache[line] = (0, *builder._line_cache[line])  # a cached line gone wrong
    builder._encodes = 0  # the next request is audited
    prefix, _ = builder.encode_shared(PROFILE, HISTORY, TARGETS)
    assert not builder.line_cache_enabled
    assert prefix == builder.encode_text(builder.prefix_text(PROFILE)) + builder.encode_text(
        "".join(builder.history_lines(HISTORY)))
