"""A tiny random Llama and word-level tokenizer, built in-process for tests.

Tests of prompts, scoring, LoRA and engines need a real ``from_pretrained`` directory, but no
download and no half-gigabyte model. This one takes a fraction of a second to build. Its
directory looks like a converted base model: Llama architecture, safetensors weights,
``tokenizer.json`` with a ChatML template, and a ``reclora_base.json`` record in the same schema
as ``training.llm.base_model``. A test there checks that schema and hashes stay in step; the
service must not import training, so the record is written here.

The tokenizer is word-level: a word, a single digit, a punctuation mark or a whitespace run is
one token, and a word outside the vocabulary becomes ``<unk>``. Whitespace runs are tokens too,
so a prompt whose words are all known decodes back to exactly the same text. "Yes" and "No" are
always whole tokens, as the answer position of the prompts requires.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from datetime import datetime, timezone
from pathlib import Path

from service.bundle import file_sha256
from service.llm.tokenizer_files import portable_tokenizer_config

SPECIAL_TOKENS = ("<unk>", "<|im_start|>", "<|im_end|>", "<pad>")  # ids 0..3
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
ANSWER_WORDS = ("Yes", "No")
WHITESPACE = (" ", "\n", "  ", "\n\n", "\t", " \n", "\n ")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Letters runs, single digits, whitespace runs, single other characters: every character lands in
# exactly one piece, which is what makes decoding exact.
_SPLIT = r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]"

DEFAULT_WORDS: tuple[str, ...] = tuple("""
a about after again against all also always am an and another any are as at away back bad be because
been before being best better between big both but by came can come could day did do does done down
during each end even every few find first for from get give go good great had has have he her here
him his how i if in into is it its just know last least left life like liked likes little long look
made make man many may me more most much must my never new next no not nothing now of off often old
on once one only or other our out over own part people place play put rather right said same saw say
see seen she should show since so some something still such take than that the their them then there
these they thing think this those three through time to too two under up us use used very was watch
watched way we well were what when where which while who whom why will with without work world would
year years yes yet you your
user users item items movie movies film films book books product products song songs show shows
rated rate rating ratings star stars review reviews score liked disliked recommend recommended
recommender system assistant answer question tell deduce predict based following order past future
history profile known unknown note should only enjoy like will whether ones
age gender male female man woman job occupation zip code country city
student engineer programmer educator writer artist doctor lawyer executive administrator librarian
technician scientist retired homemaker healthcare marketing salesman entertainment none other
action adventure animation children comedy crime documentary drama fantasy noir horror musical
mystery romance sci fi thriller war western imax genre genres title titles
story night love king lion star wars toy godfather dark knight return matrix
s t d m ll re ve ONLY
""".split())


def build_tiny_llama(out_dir: str | os.PathLike[str], *, vocab_words: list[str] | None = None,
                     hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                     head_dim: int | None = None, init_std: float = 0.2,
                     max_position_embeddings: int = 2048) -> Path:
    """Write a random float32 ``LlamaForCausalLM`` and its tokenizer to ``out_dir``; returns it.

    ``vocab_words`` replaces ``DEFAULT_WORDS``; special tokens, whitespace, ASCII punctuation,
    digits, single letters and "Yes"/"No" are always in, and every word also gets its
    capitalized form.
    ``head_dim`` defaults to hidden_size / heads (8): GPU attention kernels (vLLM) may need 32 or
    more. ``init_std`` is larger than a real model's so that different prompts get visibly
    different label probabilities.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_words, model_max_length=max_position_embeddings)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden_size // heads, max_position_embeddings=max_position_embeddings,
        initializer_range=init_std, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    portable_tokenizer_config(out, max_position_embeddings)
    _write_record(out, seed=seed, n_parameters=sum(p.numel() for p in model.parameters()))
    return out


def tiny_vocabulary(vocab_words: list[str] | None = None) -> list[str]:
    """Tokens in id order: special tokens, whitespace, punctuation, digits, answer words, single
    letters, then the words."""
    words = list(DEFAULT_WORDS if vocab_words is None else vocab_words)
    tokens = [*SPECIAL_TOKENS, *WHITESPACE, *string.punctuation, *string.digits, *ANSWER_WORDS,
              *string.ascii_letters]
    for word in words:
        tokens += [word, word[:1].upper() + word[1:]]
    return list(dict.fromkeys(tokens))  # de-duplicated, first occurrence keeps its place


def build_tiny_tokenizer(vocab_words: list[str] | None = None, *, model_max_length: int = 2048):
    """The word-level fast tokenizer (a ``PreTrainedTokenizerFast``), not yet saved."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tiny_vocabulary(vocab_words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    backend.decoder = decoders.Fuse()  # whitespace is in the tokens: decoding is concatenation
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=model_max_length)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer



# ---- the base-model record (schema of training.llm.base_model.BaseModelInfo) --------------------

PROVENANCE = "reclora_base.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def _combined_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()


def _write_record(directory: Path, *, seed: int, n_parameters: int) -> None:
    weights = {p.name: file_sha256(p) for p in sorted(directory.glob("*.safetensors"))}
    tokenizer = {n: file_sha256(directory / n) for n in _TOKENIZER_FILES if (directory / n).is_file()}
    record = {
        "format": 1,
        "source": {"kind": "tiny-random", "seed": seed},
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "n_parameters": n_parameters,
        "weights": weights,
        "model_hash": _combined_hash(weights),
        "tokenizer_hash": _combined_hash(tokenizer),
        "chat_template": True,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (directory / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
