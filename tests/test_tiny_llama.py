import json
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.llm.prompt import Behaviour, ItemText, PromptBuilder
from training.llm.scoring import score_sequences
from tests.tiny_llama import CHATML_TEMPLATE, DEFAULT_WORDS, PROVENANCE, build_tiny_llama

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")
    return out, AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()


def test_builds_fast_and_looks_like_a_base_model_directory(tmp_path, tiny) -> None:
    start = time.perf_counter()
    out = build_tiny_llama(tmp_path / "again")
    assert time.perf_counter() - start < 1.0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", PROVENANCE):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["max_position_embeddings"] == 2048
    record = json.loads((out / PROVENANCE).read_text())
    assert record["source"]["kind"] == "tiny-random" and record["dtype"] == "float32"
    assert record["model_hash"] == json.loads((tiny[0] / PROVENANCE).read_text())["model_hash"]  # same seed


def test_loads_in_transformers_with_matching_vocabulary(tiny) -> None:
    _, tokenizer, model = tiny
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_yes_and_no_are_single_distinct_known_tokens(tiny) -> None:
    _, tokenizer, _ = tiny
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("No", add_special_tokens=False)["input_ids"]
    assert len(yes) == len(no) == 1 and yes != no
    assert tokenizer.unk_token_id not in yes + no
    builder = PromptBuilder(tokenizer)
    assert (builder.yes_id, builder.no_id) == (yes[0], no[0])


def test_chatml_prompt_round_trips(tiny) -> None:
    _, tokenizer, _ = tiny
    messages = [{"role": "system", "content": "You are a recommender system. You answer only Yes or No."},
                {"role": "user", "content": "The user's age is 25. The user rated Toy Story (1995) 4 stars: [1, 2]."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("1995", add_special_tokens=False)["input_ids"]) == list("1995")


def test_unknown_words_map_to_unk(tiny) -> None:
    _, tokenizer, _ = tiny
    ids = tokenizer("the Zyzzogeton movie", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", " ", "<unk>", " ", "movie"]


def test_recommendation_prompts_mostly_tokenize(tiny) -> None:
    _, tokenizer, _ = tiny
    builder = PromptBuilder(tokenizer)
    prefix = builder.encode_text(builder.prefix_text({"gender": "F", "age": 25, "occupation": "writer"}))
    history = [Behaviour(ItemText("Toy Story", 1995), 4.0), Behaviour(ItemText("Star Wars", 1977), 1.0)]
    suffix = builder.encode_text(builder.suffix_text(history, ItemText("The Lion King", 1994)))
    assert tokenizer.unk_token_id not in prefix + suffix


def test_custom_words_replace_the_default_list(tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path / "custom", vocab_words=["godzilla"]))
    vocab = tokenizer.get_vocab()
    assert {"godzilla", "Godzilla", "Yes", "No", "7", "*"} <= vocab.keys()
    assert "movie" in DEFAULT_WORDS and "movie" not in vocab


def test_label_probabilities_differ_between_prompts(tiny) -> None:
    _, tokenizer, model = tiny
    builder = PromptBuilder(tokenizer)
    prompts = [builder.encode_text(builder.prefix_text({"age": age}) + builder.suffix_text([], ItemText(title)))
               for age in (18, 35, 60) for title in ("Toy Story", "Star Wars", "Heat")]
    probs = score_sequences(model, prompts, builder.yes_id, builder.no_id, tokenizer.pad_token_id)
    assert probs.max() - probs.min() > 0.02


def test_peft_lora_wraps_saves_and_reloads(tiny, tmp_path) -> None:
    out, tokenizer, model = tiny
    ids = tokenizer("<|im_start|>user\nthe movie<|im_end|>\n", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(out),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, base)  # B is zero at init
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
        tuned = peft_model.eval()(**ids).logits
    assert not torch.allclose(tuned, base)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, tuned)


def test_head_dim_can_be_set_for_gpu_kernels(tmp_path) -> None:
    out = build_tiny_llama(tmp_path / "wide", hidden_size=64, heads=2, kv_heads=1, head_dim=64)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.head_dim == 64
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
