"""Collaborative tokens' parts: the placeholder the prompt carries, the ids an engine reads the
vectors by, the projector's saved weights, and the embeddings a forward takes."""

import pytest
import torch
from transformers import AutoTokenizer

from service.llm.collab_tokens import (EMBED_ID_BASE, CollabConfig, CollabProjector, choose_placeholder, engine_ids,
                                       replace_placeholders, with_placeholders)
from service.llm.prompt import Behaviour, ItemText, PromptBuilder, PromptConfig
from tests.tiny_llama import build_tiny_llama

CFG = CollabConfig(user_dim=6, item_dim=4, hidden_size=8, mlp_hidden=5)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base"))


def test_the_placeholder_is_a_spare_special_token(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, PromptConfig(collab_tokens=True))
    template = builder.encode_text(builder.prefix_text({}) + builder.question(ItemText("Fargo", 1996)))
    placeholder = builder.collab_id
    assert placeholder not in template and placeholder != tokenizer.unk_token_id
    assert placeholder == choose_placeholder(tokenizer, template)
    prefix, suffixes = builder.encode_shared({}, [Behaviour(ItemText("Heat", None), 4.0)],
                                             [ItemText("Fargo", 1996), ItemText("Heat", None)])
    assert prefix[-1] == placeholder and all(s.count(placeholder) == 1 for s in suffixes)


def test_a_prompt_without_collab_tokens_keeps_its_version_and_record(tokenizer) -> None:
    for form in ("per_target", "shared"):
        plain = PromptConfig(form=form)
        assert "collab_tokens" not in plain.record()  # its file as before the mode
        on = PromptConfig(form=form, collab_tokens=True)
        assert on.record()["collab_tokens"] is True and on.version.startswith(plain.version + "+")
        assert PromptConfig.model_validate(on.record()) == on


def test_engine_ids_name_the_calls_rows() -> None:
    p = 7
    prefix, suffixes = with_placeholders([1, 2], [[3, 4, 5], [6, 4, 5]], p, end=2)
    assert prefix == [1, 2, p] and suffixes == [[3, p, 4, 5], [6, p, 4, 5]]
    ids = engine_ids(prefix, suffixes, p)
    assert ids == ([1, 2, EMBED_ID_BASE], [[3, EMBED_ID_BASE + 1, 4, 5], [6, EMBED_ID_BASE + 2, 4, 5]])
    with pytest.raises(ValueError, match="already holds"):
        with_placeholders([1, p], [[3]], p, end=0)


def test_the_projector_round_trips_and_refuses_other_shapes(tmp_path) -> None:
    projector = CollabProjector(CFG)
    assert projector.embeds(torch.randn(6), torch.randn(3, 4)).abs().max() == 0  # zero output layers at the start
    with torch.no_grad():
        for p in projector.parameters():
            p.add_(torch.randn_like(p))
    projector.save(tmp_path)
    loaded = CollabProjector.load(tmp_path)
    user, items = torch.randn(6), torch.randn(3, 4)
    assert torch.equal(loaded.embeds(user, items), projector.embeds(user, items))
    with pytest.raises(ValueError, match="do not fit"):
        CollabProjector.from_state(CFG.model_copy(update={"mlp_hidden": 6}), projector.state_dict())


def test_placeholders_take_the_vectors_in_order_with_gradients() -> None:
    embed = torch.nn.Embedding(10, 8)
    ids = torch.tensor([[1, 9, 2, 9], [9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    vectors = torch.randn(3, 8, requires_grad=True)
    out = replace_placeholders(embed, ids, 9, vectors, mask)
    assert torch.equal(out[0, 1], vectors[0]) and torch.equal(out[0, 3], vectors[1])
    assert torch.equal(out[1, 0], vectors[2])
    assert torch.equal(out[0, 0], embed.weight[1])
    out.sum().backward()
    assert vectors.grad is not None and embed.weight.grad[9].abs().sum() == 0  # the placeholder's own row is unread
    with pytest.raises(ValueError, match="3 collaborative placeholders but 2"):
        replace_placeholders(embed, ids, 9, vectors[:2], mask)
