"""Train the CRM on the full training split, early-stopping on validation AUC."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from service.crm.features import FeatureSpace, build_feature_space
from service.crm.loading import build_crm, config_for
from service.crm.model import CRM, CRMConfig
from training.crm.dataset import EncodedSplit, encode_split
from training.crm.knowledge import KnowledgeArrays
from training.data.samples import PreparedData
from training.metrics import binary_metrics


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 3
    seed: int = 0
    threads: int | None = None
    deterministic: bool = True  # bit-identical reruns for a seed (multithreaded CPU kernels otherwise differ)
    progress: bool = True
    model: dict = field(default_factory=dict)  # CRMConfig overrides


@dataclass
class TrainedCRM:
    model: CRM
    config: CRMConfig
    space: FeatureSpace
    history: list[dict]
    metrics: dict[str, dict]
    seconds: float
    knowledge: KnowledgeArrays | None = None  # what a knowledge CRM was trained with


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: CRM, data: EncodedSplit, batch_size: int = 4096) -> np.ndarray:
    """P(click) for every sample of an encoded split."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        user, target, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        logits, _ = model(user, target)
        out.append(torch.sigmoid(logits))
    return torch.cat(out).numpy() if out else np.zeros(0)


def feature_space_for(data: PreparedData) -> FeatureSpace:
    if not len(data.split("train")) or not len(data.split("valid")):
        raise ValueError("the CRM needs training and validation samples; the dataset is too small")
    return build_feature_space(
        data.users, data.items, rating_levels=np.unique(data.events["rating"]).tolist(),
        rating_min=data.meta["rating_min"], rating_max=data.meta["rating_max"],
        label_threshold=data.meta["label_threshold"],
    )


def train_crm(data: PreparedData, embeddings: np.ndarray, cfg: TrainConfig = TrainConfig(),
              knowledge: KnowledgeArrays | None = None) -> TrainedCRM:
    """Fit on ``train``, keep the epoch with the best ``valid`` AUC, report valid and test metrics.

    With ``knowledge`` the CRM reads its vectors (``knowledge_dim`` = their size): each sample
    its target's and behaviours' item vectors and its user's vector, the default where the user
    has none."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        return _train(data, embeddings, cfg, knowledge)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(data: PreparedData, embeddings: np.ndarray, cfg: TrainConfig,
           knowledge: KnowledgeArrays | None) -> TrainedCRM:
    seed_everything(cfg.seed)
    start = time.perf_counter()
    space = feature_space_for(data)
    overrides = dict(cfg.model)
    if knowledge is not None:
        overrides["knowledge_dim"] = knowledge.check(data).dim
    elif overrides.get("knowledge_dim"):
        raise ValueError("knowledge_dim is set but no knowledge was given")
    config = config_for(space, embeddings.shape[1], **overrides)
    model = build_crm(config, space, data.items, embeddings,
                      knowledge=(knowledge.item_vectors, knowledge.user_default()) if knowledge is not None else None)
    emb = torch.from_numpy(np.asarray(embeddings, np.float32))
    users = knowledge.user_table() if knowledge is not None else None
    splits = {s: encode_split(data, s, space, config, emb, progress=cfg.progress, user_knowledge=users)
              for s in ("train", "valid", "test")}
    train = splits["train"]

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(cfg.seed)
    best_auc, best_state, stale, history = -1.0, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total, seen = 0.0, 0
        bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"crm epoch {epoch}", disable=not cfg.progress, leave=False)
        for begin in bar:
            user, target, labels = train.batch(order[begin : begin + cfg.batch_size])
            logits, _ = model(user, target)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        valid = binary_metrics(splits["valid"].labels.numpy(), predict(model, splits["valid"]))
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), **{f"valid_{k}": v for k, v in valid.items()}})
        if cfg.progress:
            tqdm.write(f"epoch {epoch}: train loss {total / max(seen, 1):.4f}, valid AUC {valid['auc']:.4f}")
        if valid["auc"] > best_auc:
            best_auc, best_state, stale = valid["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    metrics = {s: binary_metrics(splits[s].labels.numpy(), predict(model, splits[s])) for s in ("valid", "test")}
    return TrainedCRM(model, config, space, history, metrics, time.perf_counter() - start, knowledge)
