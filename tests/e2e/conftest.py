"""The end-to-end world, built once per test session.

Real artefacts, end to end: a synthetic dataset prepared with the training protocol, a CRM trained
on it, random L2-normalized item embeddings (16-d, for speed), a tiny random Llama as the base
LLM, a personalized LoRA trained for a couple of steps with ``train_llm`` (then with its B banks
perturbed so adapters visibly matter), a fusion file, all exported as one model bundle; every
user's history and profile bulk-loaded into the real Redis under a key prefix unique to this
session (deleted afterwards); and the service itself under uvicorn on a loopback port, its model
built by the lifespan from ``Settings`` exactly as in production (``build_scorer``).

``reference`` recomputes the LLM's answer independently of the serving engine: a float32 copy of
the base model with ``PersonalizedLoRA`` loaded from the bundle's weights, scored with
``service.llm.scoring.score_sequences`` on full prompts (no prefix KV reuse).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from redis_support import scratch_prefix
from e2e_support import EMBEDDING_DIM, FUSION, REDIS_URL, VERSION, LiveServer, Reference, World, train_lora


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    """A key prefix unique to this session on the real Redis; its keys are deleted afterwards."""
    with scratch_prefix("e2e") as prefix:
        yield prefix


@pytest.fixture(scope="session")
def world(tmp_path_factory, redis_prefix: str) -> World:
    from service.history import bulk_load
    from service.llm.tiny import build_tiny_llama
    from training.crm.checkpoint import save_checkpoint
    from training.crm.train import TrainConfig, train_crm
    from training.data.samples import prepare
    from training.data.synthetic import generate_synthetic
    from training.export.crm_bundle import export_crm_bundle
    from training.history_loader import histories_from_prepared

    root = tmp_path_factory.mktemp("e2e")
    data = prepare(generate_synthetic(n_users=120, n_items=80, n_interactions=3000, seed=3))
    data_dir = data.save(root / "data")
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(data.items) + 1, EMBEDDING_DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings[0] = 0  # row 0 is padding
    np.save(data_dir / "embeddings.npy", embeddings)

    # A small CRM (one epoch, short search/recent windows) keeps the session setup to seconds on two
    # cores; user_dim stays at its default, the size the LoRA gates read.
    trained = train_crm(data, embeddings, TrainConfig(epochs=1, batch_size=256, progress=False, model=dict(
        emb_dim=16, l_crm=20, l_recent=20, mlp_hidden=[64, 32])))
    crm_dir = save_checkpoint(trained, root / "crm")
    base_dir = build_tiny_llama(root / "base")
    train_lora(data, embeddings, crm_dir, base_dir, root / "lora")
    report = root / "report"
    report.mkdir()
    (report / "fusion.json").write_text(json.dumps(FUSION))
    (report / "report.json").write_text(json.dumps({"note": "e2e fixture: fusion weights set by hand"}))
    store = root / "model_store"
    bundle_dir = export_crm_bundle(data_dir, crm_dir, store, VERSION, description="e2e", llm_dir=root / "lora",
                                   base_model=base_dir, llm_report=report)

    records = list(histories_from_prepared(data))
    counts = bulk_load(REDIS_URL, records, prefix=redis_prefix, progress=False, total=len(records))
    assert counts["users"] == len(records) == len(data.users)
    histories = {user: (items, ratings, stamps, profile) for user, items, ratings, stamps, profile in records}
    users = sorted((u for u, h in histories.items() if len(h[0]) >= 10), key=lambda u: -len(histories[u][0]))
    assert len(users) >= 12, "the synthetic world needs a dozen users with real histories"
    return World(root, data, base_dir, store, VERSION, bundle_dir, redis_prefix, histories, users, len(data.items))


@pytest.fixture(scope="session")
def live(world: World) -> Iterator[LiveServer]:
    """The service over real HTTP, its scorer built by the lifespan from settings."""
    server = LiveServer.start(world.settings())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client() as client:
        yield client


@pytest.fixture(scope="session")
def reference(world: World) -> Reference:
    return Reference(world)
