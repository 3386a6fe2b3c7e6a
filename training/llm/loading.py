"""Models from disk: the base LLM, and a trained (personalized) LoRA on it as a scorer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.llm.collab_tokens import CONFIG_FILE as COLLAB_CONFIG, CollabProjector
from service.llm.personalized_lora import PersonalizedLoRA, PersonalizedLoRAConfig
from service.llm.precision import resolve_dtype
from service.llm.prompt import PromptConfig
from training.llm.offline_scoring import LLMScorer


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: cuda when available, else cpu; any other name as given."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))


def load_base(base_dir: str | Path, dtype: str, device: str = "auto"):
    """(model in eval mode on ``device``, tokenizer) of a base model directory; ``dtype`` as
    ``service.llm.precision.resolve_dtype`` reads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=resolve_dtype(dtype, target)).eval()
    return model.to(target), tokenizer


def load_trained(out_dir: Path, base_dir: Path, dtype: str = "float32", k_text: int = 10,
                 device: str = "auto") -> LLMScorer:
    """A trained LoRA directory as a scorer, worded as it was trained (``train.json``'s prompt),
    with its collaborative tokens' projector where it has one."""
    model, tokenizer = load_base(base_dir, dtype, device)
    lora = PersonalizedLoRA(model, PersonalizedLoRAConfig.model_validate_json((out_dir / "config.json").read_text()))
    lora.load_trainable_state_dict(load_file(out_dir / "weights.safetensors"))
    lora.to(model.device)
    train = out_dir / "train.json"
    prompt = PromptConfig.model_validate(json.loads(train.read_text())["prompt"]) if train.is_file() else None
    collab = CollabProjector.load(out_dir).to(model.device) if (out_dir / COLLAB_CONFIG).is_file() else None
    return LLMScorer(model, tokenizer, lora, k_text, prompt, collab=collab)
