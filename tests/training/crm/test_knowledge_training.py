"""The knowledge CRM on synthetic data with planted knowledge (``knowledge_support``): it uses the
vectors and beats the plain CRM; knowledge directories are checked; checkpoints keep what the
CRM reads; ``reclora train-crm --knowledge`` refuses a directory that does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.knowledge_support import META, fabricate_knowledge, planted_vectors, write_knowledge
from typer.testing import CliRunner

from training.cli import app
from training.crm.checkpoint import KNOWLEDGE_FILES, load_checkpoint, load_user_knowledge, save_checkpoint
from training.crm.dataset import encode_split
from training.crm.knowledge import KnowledgeError, load_knowledge
from training.crm.train import TrainConfig, predict, train_crm
from training.data.samples import prepare
from training.data.synthetic import generate_synthetic

MODEL = dict(emb_dim=16, l_crm=20, l_recent=20, mlp_hidden=[64, 32])


def _embeddings(n_items: int) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(n_items + 1, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0] = 0
    return x


def _config(epochs: int = 12) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=256, lr=3e-3, seed=0, progress=False, threads=1, model=dict(MODEL))


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the trainer sets its own (one: fastest for these tiny models)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return prepare(generate_synthetic(n_users=150, n_items=100, n_interactions=5000, seed=0))


@pytest.fixture(scope="module")
def knowledge(data, tmp_path_factory):
    return load_knowledge(fabricate_knowledge(data, tmp_path_factory.mktemp("knowledge"), dim=32), data)


@pytest.fixture(scope="module")
def trained(data, knowledge):
    return train_crm(data, _embeddings(len(data.items)), _config(), knowledge)


def test_knowledge_crm_beats_the_plain_crm(data, trained) -> None:
    plain = train_crm(data, _embeddings(len(data.items)), _config())
    assert trained.config.knowledge_dim == 32 and plain.config.knowledge_dim == 0
    # Planted knowledge knows each user's taste beyond the history before a sample.
    assert trained.metrics["valid"]["auc"] > plain.metrics["valid"]["auc"] + 0.02, (trained.metrics, plain.metrics)
    assert trained.metrics["test"]["auc"] > plain.metrics["test"]["auc"] + 0.02, (trained.metrics, plain.metrics)


def test_scores_follow_the_user_vectors(data, knowledge, trained) -> None:
    emb = torch.from_numpy(_embeddings(len(data.items)))
    users = knowledge.user_table()
    split = encode_split(data, "valid", trained.space, trained.config, emb, progress=False, user_knowledge=users)
    shuffled = users[np.random.default_rng(0).permutation(len(users))]
    other = encode_split(data, "valid", trained.space, trained.config, emb, progress=False, user_knowledge=shuffled)
    a, b = predict(trained.model, split), predict(trained.model, other)
    assert np.abs(a - b).mean() > 0.01


def test_users_without_knowledge_read_the_default(data, knowledge, trained) -> None:
    assert (~knowledge.user_has[1:]).any()
    np.testing.assert_allclose(knowledge.user_default(), knowledge.user_vectors[knowledge.user_has].mean(0), rtol=1e-6)
    emb = torch.from_numpy(_embeddings(len(data.items)))
    users = knowledge.user_table()
    filled = users.copy()
    filled[~knowledge.user_has] = knowledge.user_default()
    a = predict(trained.model, encode_split(data, "test", trained.space, trained.config, emb, progress=False,
                                            user_knowledge=users))
    b = predict(trained.model, encode_split(data, "test", trained.space, trained.config, emb, progress=False,
                                            user_knowledge=filled))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="reads user knowledge vectors: pass user_knowledge"):
        encode_split(data, "test", trained.space, trained.config, emb, progress=False)
    with pytest.raises(ValueError, match="reads 32-d vectors"):
        encode_split(data, "test", trained.space, trained.config, emb, progress=False, user_knowledge=users[:, :8])


def test_checkpoint_keeps_the_knowledge(data, knowledge, trained, tmp_path) -> None:
    emb = _embeddings(len(data.items))
    save_checkpoint(trained, tmp_path)
    model, config, space = load_checkpoint(tmp_path, data.items, emb)
    assert config.knowledge_dim == 32
    np.testing.assert_array_equal(model.item_knowledge_vectors.numpy(), knowledge.item_vectors)
    np.testing.assert_allclose(model.user_knowledge_default.numpy(), knowledge.user_default())
    users = load_user_knowledge(tmp_path)
    np.testing.assert_array_equal(users, knowledge.user_table())
    split = encode_split(data, "test", space, config, torch.from_numpy(emb), progress=False, user_knowledge=users)
    from training.metrics import binary_metrics
    np.testing.assert_allclose(binary_metrics(split.labels.numpy(), predict(model, split))["auc"],
                               trained.metrics["test"]["auc"])
    assert json.loads((tmp_path / KNOWLEDGE_FILES["config"]).read_text())["encoder"] == META["encoder"]
    (tmp_path / KNOWLEDGE_FILES["user_default"]).unlink()
    with pytest.raises(FileNotFoundError, match="needs knowledge/user_default.npy"):
        load_checkpoint(tmp_path, data.items, emb)


def test_plain_checkpoint_has_no_knowledge(data, trained, tmp_path) -> None:
    save_checkpoint(trained, tmp_path)
    plain = train_crm(data, _embeddings(len(data.items)), _config(epochs=1))
    save_checkpoint(plain, tmp_path)  # over the knowledge CRM: its knowledge files go
    assert load_user_knowledge(tmp_path) is None
    assert not any((tmp_path / rel).exists() for rel in KNOWLEDGE_FILES.values())


def test_knowledge_directories_are_checked(data, tmp_path) -> None:
    items, users, has = planted_vectors(data, dim=16)
    assert load_knowledge(write_knowledge(tmp_path / "ok", items, users, has), data).dim == 16
    cases = {
        "rows": ((items[:-1], users, has, {}), r"item_vectors has 100 rows, the dataset needs 101 \(n_items \+ 1\)"),
        "user rows": ((items, users[:-1], has[:-1], {}), "user_vectors has 150 rows, the dataset needs 151"),
        "dims": ((items, users[:, :8], has, {}), "user vectors are 8-d, item vectors 16-d"),
        "nan": ((np.where(np.arange(len(items))[:, None] == 3, np.nan, items), users, has, {}),
                "item_vectors has non-finite values"),
        "has": ((items, users, has.astype(np.int64), {}), "user_has must be bool"),
        "meta dim": ((items, users, has, {"dim": 384}), "knowledge.json says dim 384, the vectors are 16-d"),
        "encoder": ((items, users, has, {"encoder": ""}), "knowledge.json is not valid"),
    }
    for name, ((i, u, h, meta), message) in cases.items():
        with pytest.raises(KnowledgeError, match=message):
            load_knowledge(write_knowledge(tmp_path / name.replace(" ", "_"), i, u, h, **meta), data)
    (tmp_path / "ok" / "user_has.npy").unlink()
    with pytest.raises(KnowledgeError, match="is not a knowledge directory .*missing user_has.npy"):
        load_knowledge(tmp_path / "ok")


def test_train_crm_command_refuses_knowledge_that_does_not_fit(data, tmp_path) -> None:
    data_dir = data.save(tmp_path / "data")
    np.save(data_dir / "embeddings.npy", _embeddings(len(data.items)))
    items, users, has = planted_vectors(data, dim=16)
    bad = write_knowledge(tmp_path / "k", items[:50], users, has)
    result = CliRunner().invoke(app, ["train-crm", "--data", str(data_dir), "--knowledge", str(bad), "--epochs", "1"])
    assert result.exit_code == 2 and "item_vectors has 50 rows" in result.output
    assert not (data_dir / "crm").exists()
