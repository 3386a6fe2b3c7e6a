"""Train the CRM on the full training split, early-stopping on validation AUC.

Under torchrun (``training.distributed``) every rank draws the same epoch order and takes a
contiguous share of each batch; a share's loss is its summed BCE over the whole batch's size, and
the gradients are summed over the ranks, so a step is the single-process step at the same batch
(to floating-point summation order). Validation and the final metrics score each split in shares,
gathered in order, so every rank stops at the same epoch. Dropout draws from each rank's own
stream (seeded by rank and step): with ``dropout = 0`` a distributed run is the same run, with
dropout the same training in distribution. The caller saves the checkpoint on rank 0.
"""

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
from training.distributed import Ranks, current, rank_step_seed
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
def predict(model: CRM, data: EncodedSplit, batch_size: int = 4096, ranks: Ranks | None = None) -> np.ndarray:
    """P(click) for every sample of an encoded split (distributed: each rank its contiguous
    share, gathered in order on every rank)."""
    ranks = ranks or Ranks()
    model.eval()
    rows = range(len(data))[ranks.share(len(data))]
    out = []
    for start in range(rows.start, rows.stop, batch_size):
        user, target, _ = data.batch(torch.arange(start, min(start + batch_size, rows.stop)))
        logits, _ = model(user, target)
        out.append(torch.sigmoid(logits))
    local = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
    return ranks.gather(local).astype(np.float32) if ranks.distributed else local


def feature_space_for(data: PreparedData) -> FeatureSpace:
    if not len(data.split("train")) or not len(data.split("valid")):
        raise ValueError("the CRM needs training and validation samples; the dataset is too small")
    return build_feature_space(
        data.users, data.items, rating_levels=np.unique(data.events["rating"]).tolist(),
        rating_min=data.meta["rating_min"], rating_max=data.meta["rating_max"],
        label_threshold=data.meta["label_threshold"],
    )


def train_crm(data: PreparedData, embeddings: np.ndarray, cfg: TrainConfig = TrainConfig(),
              knowledge: KnowledgeArrays | None = None, ranks: Ranks | None = None) -> TrainedCRM:
    """Fit on ``train``, keep the epoch with the best ``valid`` AUC, report valid and test metrics.

    With ``knowledge`` the CRM reads its vectors (``knowledge_dim`` = their size): each sample
    its target's and behaviours' item vectors and its user's vector, the default where the user
    has none. ``ranks`` (default: the torchrun process group joined, else one process) shares
    the batches out (see the module docstring)."""
    ranks = current() if ranks is None else ranks
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        return _train(data, embeddings, cfg, knowledge, ranks)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(data: PreparedData, embeddings: np.ndarray, cfg: TrainConfig,
           knowledge: KnowledgeArrays | None, ranks: Ranks) -> TrainedCRM:
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
    progress = cfg.progress and ranks.is_main
    splits = {s: encode_split(data, s, space, config, emb, progress=progress, user_knowledge=users)
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
        bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"crm epoch {epoch}", disable=not progress, leave=False)
        for step, begin in enumerate(bar):
            batch = order[begin : begin + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            if ranks.distributed:
                seed = rank_step_seed(cfg.seed, epoch * len(bar) + step, ranks.rank)
                loss_sum = _distributed_backward(model, train, batch, ranks, seed)
            else:
                user, target, labels = train.batch(batch)
                logits, _ = model(user, target)
                loss = loss_fn(logits, labels)
                loss.backward()
                loss_sum = loss.item() * len(labels)
            optimizer.step()
            total += loss_sum
            seen += len(batch)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        valid = binary_metrics(splits["valid"].labels.numpy(), predict(model, splits["valid"], ranks=ranks))
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), **{f"valid_{k}": v for k, v in valid.items()}})
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {total / max(seen, 1):.4f}, valid AUC {valid['auc']:.4f}")
        if valid["auc"] > best_auc:
            best_auc, best_state, stale = valid["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    metrics = {s: binary_metrics(splits[s].labels.numpy(), predict(model, splits[s], ranks=ranks))
               for s in ("valid", "test")}
    return TrainedCRM(model, config, space, history, metrics, time.perf_counter() - start, knowledge)


def _distributed_backward(model: CRM, train: EncodedSplit, batch: torch.Tensor, ranks: Ranks, seed: int) -> float:
    """This rank's share of ``batch`` forward and backward, its BCE summed and divided by the whole
    batch's size, the gradients then summed over the ranks; returns the batch's summed loss."""
    mine = batch[ranks.share(len(batch))]
    loss_sum = 0.0
    if len(mine):
        torch.manual_seed(seed)  # this rank's dropout in this step
        user, target, labels = train.batch(mine)
        logits, _ = model(user, target)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        (loss / len(batch)).backward()
        loss_sum = loss.item()
    ranks.sum_gradients(list(model.parameters()))
    return ranks.sum([loss_sum])[0]
