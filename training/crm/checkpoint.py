"""A trained CRM on disk: the same file names the bundle uses under ``crm/``.

A knowledge CRM also keeps, under ``knowledge/``, the item vectors and the default user vector it
reads (as the bundle does), the knowledge config, and the training users' vectors, so offline
callers can score the dataset's samples from the checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load_file, save_file

from service.crm.features import FeatureSpace
from service.crm.loading import build_crm
from service.crm.model import CRM, CRMConfig
from training.crm.train import TrainedCRM

FILES = {"config": "config.json", "features": "features.json", "weights": "weights.safetensors",
         "metrics": "metrics.json", "history": "history.json"}
KNOWLEDGE_FILES = {"item_vectors": "knowledge/item_vectors.npy", "user_default": "knowledge/user_default.npy",
                   "config": "knowledge/config.json", "user_vectors": "knowledge/user_vectors.npy",
                   "user_has": "knowledge/user_has.npy"}


def save_checkpoint(trained: TrainedCRM, directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / FILES["config"]).write_text(trained.config.model_dump_json(indent=2))
    (out / FILES["features"]).write_text(trained.space.model_dump_json(indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in trained.model.state_dict().items()}
    save_file(state, out / FILES["weights"])
    (out / FILES["metrics"]).write_text(json.dumps({**trained.metrics, "train_seconds": trained.seconds}, indent=2))
    (out / FILES["history"]).write_text(json.dumps(trained.history, indent=2))
    if trained.knowledge is not None:
        k = trained.knowledge
        (out / "knowledge").mkdir(exist_ok=True)
        for key, array in (("item_vectors", k.item_vectors), ("user_default", k.user_default()),
                           ("user_vectors", k.user_vectors), ("user_has", k.user_has)):
            np.save(out / KNOWLEDGE_FILES[key], array, allow_pickle=False)
        (out / KNOWLEDGE_FILES["config"]).write_text(json.dumps(k.meta, indent=2))
    else:  # a plain CRM saved over a knowledge one must not look like one
        for rel in KNOWLEDGE_FILES.values():
            (out / rel).unlink(missing_ok=True)
    return out


def load_checkpoint(directory: str | Path, catalog: pd.DataFrame, embeddings: np.ndarray) -> tuple[CRM, CRMConfig, FeatureSpace]:
    """The CRM in eval mode, its knowledge installed when it reads knowledge; encode its samples
    with ``user_knowledge=load_user_knowledge(directory)``."""
    src = Path(directory)
    config = CRMConfig.model_validate_json((src / FILES["config"]).read_text())
    space = FeatureSpace.model_validate_json((src / FILES["features"]).read_text())
    knowledge = None
    if config.knowledge_dim:
        knowledge = (_load(src, "item_vectors"), _load(src, "user_default"))
    model = build_crm(config, space, catalog, embeddings, load_file(src / FILES["weights"]), knowledge)
    return model.eval(), config, space


def load_user_knowledge(directory: str | Path) -> np.ndarray | None:
    """(n_users + 1, D) the training users' knowledge vectors by user_idx (zero rows: none), or
    None for a CRM without knowledge."""
    src = Path(directory)
    if not CRMConfig.model_validate_json((src / FILES["config"]).read_text()).knowledge_dim:
        return None
    vectors, has = _load(src, "user_vectors"), _load(src, "user_has")
    return np.where(has.astype(bool)[:, None], vectors, 0.0).astype(np.float32)


def load_knowledge_config(directory: str | Path) -> dict | None:
    """The knowledge.json a knowledge CRM was trained with, or None."""
    path = Path(directory) / KNOWLEDGE_FILES["config"]
    return json.loads(path.read_text()) if path.is_file() else None


def _load(src: Path, key: str) -> np.ndarray:
    path = src / KNOWLEDGE_FILES[key]
    if not path.is_file():
        raise FileNotFoundError(f"{src}: a knowledge CRM checkpoint needs {KNOWLEDGE_FILES[key]}, which is missing")
    return np.load(path, allow_pickle=False)
