import numpy as np
import pytest
import torch

from training.crm.checkpoint import load_checkpoint, save_checkpoint
from training.crm.dataset import encode_split
from training.crm.train import TrainConfig, predict, train_crm
from training.data.samples import prepare
from training.data.synthetic import generate_synthetic
from training.metrics import binary_metrics


def _embeddings(n_items: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n_items + 1, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0] = 0
    return x


@pytest.fixture(scope="module")
def data():
    return prepare(generate_synthetic(n_users=300, n_items=200, n_interactions=12000, seed=0))


@pytest.fixture(scope="module")
def trained(data):
    cfg = TrainConfig(epochs=8, batch_size=256, lr=3e-3, seed=0, progress=False, model=dict(emb_dim=16))
    return train_crm(data, _embeddings(len(data.items)), cfg)


def test_crm_learns_planted_preferences(trained) -> None:
    assert trained.metrics["test"]["auc"] > 0.70, trained.metrics
    assert trained.metrics["valid"]["auc"] > 0.70, trained.metrics
    best = max(h["valid_auc"] for h in trained.history)
    assert trained.metrics["valid"]["auc"] == pytest.approx(best)  # the best validation epoch is kept


def test_training_is_deterministic(data, trained) -> None:
    cfg = TrainConfig(epochs=2, batch_size=256, lr=3e-3, seed=0, progress=False, model=dict(emb_dim=16))
    a = train_crm(data, _embeddings(len(data.items)), cfg)
    b = train_crm(data, _embeddings(len(data.items)), cfg)
    assert a.history == b.history


def test_checkpoint_round_trip(data, trained, tmp_path) -> None:
    emb = _embeddings(len(data.items))
    save_checkpoint(trained, tmp_path)
    model, config, space = load_checkpoint(tmp_path, data.items, emb)
    split = encode_split(data, "test", space, config, torch.from_numpy(emb), progress=False)
    probs = predict(model, split)
    np.testing.assert_allclose(binary_metrics(split.labels.numpy(), probs)["auc"], trained.metrics["test"]["auc"])
