"""A knowledge CRM through the whole path: trained, checkpointed, exported as a bundle, loaded by
the runtime and scored by the CRM stage exactly as the offline code scores the same samples."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tests.knowledge_support import META, fabricate_knowledge

from service.bundle import BundleError, load_bundle
from service.model import load_model
from service.scoring.stages import UserHistoryView, run_crm
from training.crm.checkpoint import load_user_knowledge, save_checkpoint
from training.crm.knowledge import load_knowledge
from training.crm.train import TrainConfig, train_crm
from training.export.crm_bundle import export_crm_bundle
from training.llm.crm_outputs import crm_probabilities, user_representations

DIM = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from training.data.samples import prepare
    from training.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("knowledge-bundle")
    data = prepare(generate_synthetic(n_users=80, n_items=60, n_interactions=2000, seed=4))
    data_dir = data.save(root / "data")
    emb = np.random.default_rng(0).normal(size=(len(data.items) + 1, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0
    np.save(data_dir / "embeddings.npy", emb)
    knowledge = load_knowledge(fabricate_knowledge(data, root / "knowledge", dim=DIM), data)
    threads = torch.get_num_threads()
    cfg = TrainConfig(epochs=1, batch_size=256, progress=False, threads=1,
                      model=dict(emb_dim=16, l_crm=20, l_recent=20, mlp_hidden=[32, 16]))
    try:
        trained = train_crm(data, emb, cfg, knowledge)
    finally:
        torch.set_num_threads(threads)
    crm_dir = save_checkpoint(trained, root / "crm")
    bundle = export_crm_bundle(data_dir, crm_dir, root / "store", "k1")
    return data, emb, knowledge, crm_dir, bundle, data_dir


def views(data, samples: pd.DataFrame, knowledge: np.ndarray | None) -> list[UserHistoryView]:
    out = []
    for _, s in samples.iterrows():
        history = data.history(s)
        row = data.users[data.users["user_idx"] == s["user_idx"]].iloc[0]
        profile = {c: str(v) for c, v in row.items() if c not in ("user", "user_idx")}
        vector = None if knowledge is None else knowledge[int(s["user_idx"])]
        out.append(UserHistoryView(np.array(history["item_idx"], np.int64), np.array(history["rating"], np.float32),
                                   profile, vector))
    return out


def test_bundle_carries_the_knowledge_parts(world) -> None:
    data, _, knowledge, crm_dir, bundle_dir, _ = world
    bundle = load_bundle(bundle_dir)
    component = bundle.manifest.components["knowledge"]
    assert component.kind == "kar-hybrid-expert"
    assert component.config["dim"] == DIM and component.config["encoder"] == META["encoder"]
    np.testing.assert_array_equal(bundle.load_npy("knowledge/item_vectors.npy"), knowledge.item_vectors)
    np.testing.assert_allclose(bundle.load_npy("knowledge/user_default.npy"), knowledge.user_default())
    config = bundle.load_json("knowledge/config.json")
    assert config["prompts"] == META["prompts"] and config["generator"] == META["generator"]
    assert not any("user_vectors" in f.path for f in bundle.manifest.files)  # users' vectors live in Redis

    model = load_model(bundle_dir)
    assert model.knowledge.encoder == META["encoder"] and model.knowledge.dim == DIM
    assert model.knowledge.prompts == META["prompts"]
    assert model.crm_config.knowledge_dim == DIM


def test_the_crm_stage_scores_as_offline(world) -> None:
    data, emb, knowledge, crm_dir, bundle_dir, _ = world
    model = load_model(bundle_dir)
    test = data.split("test")
    samples = test[test["hist_len"] >= 5].drop_duplicates("user_idx").head(6).reset_index(drop=True)
    has = knowledge.user_has[samples["user_idx"].to_numpy()]
    assert has.any()
    offline = crm_probabilities(data, samples, crm_dir, emb)
    offline_reps = user_representations(data, samples, crm_dir, emb)
    table = load_user_knowledge(crm_dir)
    for i, view in enumerate(views(data, samples, table)):
        result = run_crm(model, view, np.asarray([samples.loc[i, "item_idx"]]))
        np.testing.assert_allclose(result.scores[0], offline[i], atol=1e-5)
        np.testing.assert_allclose(result.user_rep.numpy(), offline_reps[i].numpy(), atol=1e-5)


def test_missing_or_foreign_vectors_read_the_default(world) -> None:
    data, _, knowledge, _, bundle_dir, _ = world
    model = load_model(bundle_dir)
    sample = data.split("test").head(1)
    candidates = np.arange(1, 11)
    [view] = views(data, sample, None)
    default = run_crm(model, view, candidates)
    view.knowledge = knowledge.user_default()
    np.testing.assert_array_equal(run_crm(model, view, candidates).scores, default.scores)
    view.knowledge = np.ones(DIM + 1, np.float32)  # another encoder's vector: not read
    np.testing.assert_array_equal(run_crm(model, view, candidates).scores, default.scores)
    view.knowledge = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
    assert np.abs(run_crm(model, view, candidates).scores - default.scores).max() > 1e-4


def test_export_refuses_a_checkpoint_without_its_knowledge(world, tmp_path) -> None:
    import shutil

    _, _, _, crm_dir, _, data_dir = world
    broken = shutil.copytree(crm_dir, tmp_path / "crm")
    (broken / "knowledge" / "item_vectors.npy").unlink()
    with pytest.raises(BundleError, match="reads knowledge but its checkpoint lacks knowledge/item_vectors.npy"):
        export_crm_bundle(data_dir, broken, tmp_path / "store", "k2")
    config = json.loads((crm_dir / "config.json").read_text())
    assert config["knowledge_dim"] == DIM
