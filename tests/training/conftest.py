"""A small training world for the LLM training tests: synthetic data, random item embeddings, a
trained CRM checkpoint (``root/crm``) and a tiny random Llama (``root/base``). Each test module
writes its outputs under its own names in ``root``."""

import numpy as np
import pytest

from tests.tiny_llama import build_tiny_llama
from training.crm.checkpoint import save_checkpoint
from training.crm.train import TrainConfig, train_crm
from training.data.samples import prepare
from training.data.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def llm_world(tmp_path_factory):
    """(root, data, item embeddings, base model directory), one per test module."""
    root = tmp_path_factory.mktemp("llm")
    data = prepare(generate_synthetic(n_users=120, n_items=80, n_interactions=4000, seed=3))
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(data.items) + 1, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0
    save_checkpoint(train_crm(data, emb, TrainConfig(epochs=2, batch_size=256, progress=False)), root / "crm")
    base = build_tiny_llama(root / "base", hidden_size=32, layers=2)
    return root, data, emb, base
