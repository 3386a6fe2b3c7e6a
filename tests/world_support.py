"""The model world many suites share, built once per test session: a synthetic dataset prepared
with the training protocol, a CRM trained on it, random L2-normalized item embeddings (16-d, for
speed), a tiny random Llama as the base LLM, a personalized LoRA trained for a couple of steps with
``train_llm`` (then with its B banks perturbed so adapters visibly matter), a fusion file, all
exported as one model bundle; every user's history and profile bulk-loaded into the real Redis
under a key prefix unique to this session (``World.load_histories`` loads them into another store,
e.g. the session's cluster, the same way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tests.redis_support import SINGLE, RedisTarget
from service.config import Settings

VERSION = "e2e-v1"
FUSION = {"w_llm": 0.8, "w_crm": 0.6, "bias": -0.1}
EMBEDDING_DIM = 16
# user_dim = the CRM's default user_dim; a low gate temperature makes the per-user mixtures of the
# barely trained gates distinct (near-uniform at T = 1), so users really get different adapters.
LORA = dict(n_meta=4, user_dim=64, r=4, lora_alpha=8.0, temperature=0.1)
B_NOISE_STD = 0.3

UserRecords = tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]


@dataclass
class World:
    root: Path
    data: object  # training.data.samples.PreparedData
    base_dir: Path
    store: Path
    version: str
    bundle_dir: Path
    prefix: str
    histories: dict[str, UserRecords]  # raw user id -> (raw items, ratings, timestamps, profile), as loaded
    users: list[str]  # known users, longest history first
    n_items: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def crm_dir(self) -> Path:
        return self.root / "crm"

    def load_histories(self, target: RedisTarget, prefix: str) -> None:
        """Every user's history and profile, as loaded for the session, into ``target`` under ``prefix``
        (the bulk loader, as ``reclora load-histories`` runs it)."""
        from service.history import bulk_load

        records = [(user, *self.histories[user]) for user in self.histories]
        counts = bulk_load(target.history(), records, prefix=prefix, progress=False, total=len(records))
        assert counts["users"] == len(records)

    def settings(self, target: RedisTarget = SINGLE, **overrides) -> Settings:
        """Gateway settings on ``target`` (the session's single node unless told) and the world's prefix."""
        values = dict(**target.values(), redis_prefix=self.prefix, model_store=self.store,
                      active_version=self.version, base_model_dir=self.base_dir,
                      # Generous deadlines: a loaded 2-core CI box must not turn the happy path into
                      # a degraded answer. The deadline fallbacks ask for tiny deadlines explicitly.
                      default_deadline_ms=20_000, max_deadline_ms=30_000, history_budget_ms=2_000,
                      # Every LLM score live, so each test sees its own request's decisions; the
                      # score cache has tests of its own.
                      llm_score_cache=False, log_json=True, log_level="WARNING")
        values.update(overrides)
        return Settings(**values)


def train_lora(data, embeddings: np.ndarray, crm_dir: Path, base_dir: Path, out_dir: Path) -> None:
    from training.llm.train import LLMTrainConfig, train_llm

    cfg = LLMTrainConfig(n_samples=8, k_text=3, mixed=False, epochs=1, batch_size=8, grad_accum=1, lr=5e-3,
                         valid_samples=8, evals_per_epoch=1, dtype="float32", device="cpu", progress=False,
                         lora=LORA)
    train_llm(data, embeddings, crm_dir, base_dir, out_dir, cfg)
    perturb_lora_b(out_dir)


def perturb_lora_b(out_dir: Path) -> None:
    """One optimizer step leaves the B banks (zero-initialized) tiny, so every user's adapter would be
    nearly the identity. Perturb them, differently per meta-LoRA, so the gate's per-user mixture
    changes the LLM's answer visibly: the suites then check that personalization is really live."""
    weights = load_file(out_dir / "weights.safetensors")
    gen = torch.Generator().manual_seed(1)
    for key, value in weights.items():
        if key.endswith(".lora_B"):
            weights[key] = (value + B_NOISE_STD * torch.randn(value.shape, generator=gen)).contiguous()
    save_file(weights, out_dir / "weights.safetensors")


def item_rate_crm(world: World, out: Path, sign: float = 1.0) -> Path:
    """The world's CRM checkpoint rebuilt to score each item by its observed positive rate (deep
    and wide parts zeroed, item biases the rate's log-odds, times ``sign``): a CRM that clearly
    ranks the validation samples, which the briefly trained one barely does on this small world;
    with ``sign=-1`` one that ranks them upside down. The same files, so it loads and exports alike."""
    import shutil

    shutil.copytree(world.crm_dir, out)
    weights = load_file(out / "weights.safetensors")
    samples = world.data.samples
    positives = np.bincount(samples["item_idx"], weights=samples["label"], minlength=world.n_items + 1)
    rate = (positives + 1.0) / (np.bincount(samples["item_idx"], minlength=world.n_items + 1) + 2.0)
    for key in ("head.1.weight", "head.1.bias", "wide.weight", "wide.bias"):
        weights[key] = torch.zeros_like(weights[key])
    bias = torch.from_numpy(sign * 3.0 * np.log(rate / (1 - rate))).to(weights["item_bias.weight"].dtype)
    bias[0] = 0.0  # padding
    weights["item_bias.weight"] = bias.reshape(-1, 1)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "weights.safetensors")
    return out


def build_world(root: Path, prefix: str) -> World:
    """Every artefact of the world under ``root``; histories loaded into Redis under ``prefix``."""
    from service.history import bulk_load
    from tests.tiny_llama import build_tiny_llama
    from training.crm.checkpoint import save_checkpoint
    from training.crm.train import TrainConfig, train_crm
    from training.data.samples import prepare
    from training.data.synthetic import generate_synthetic
    from training.export.crm_bundle import export_crm_bundle
    from training.history_loader import histories_from_prepared
    from training.llm.fusion_fit import FusionOptions

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
    # Served fused whatever validation says of the barely trained LoRA: the suites check the fusion path.
    bundle_dir = export_crm_bundle(data_dir, crm_dir, store, VERSION, description="e2e", llm_dir=root / "lora",
                                   base_model=base_dir, llm_report=report, fusion=FusionOptions(serve="fused"))

    records = list(histories_from_prepared(data))
    counts = bulk_load(SINGLE.history(), records, prefix=prefix, progress=False, total=len(records))
    assert counts["users"] == len(records) == len(data.users)
    histories = {user: (items, ratings, stamps, profile) for user, items, ratings, stamps, profile in records}
    users = sorted((u for u, h in histories.items() if len(h[0]) >= 10), key=lambda u: -len(histories[u][0]))
    assert len(users) >= 12, "the synthetic world needs a dozen users with real histories"
    return World(root, data, base_dir, store, VERSION, bundle_dir, prefix, histories, users, len(data.items))
