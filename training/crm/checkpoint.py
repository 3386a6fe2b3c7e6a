"""A trained CRM on disk: the same file names the bundle uses under ``crm/``."""

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


def save_checkpoint(trained: TrainedCRM, directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / FILES["config"]).write_text(trained.config.model_dump_json(indent=2))
    (out / FILES["features"]).write_text(trained.space.model_dump_json(indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in trained.model.state_dict().items()}
    save_file(state, out / FILES["weights"])
    (out / FILES["metrics"]).write_text(json.dumps({**trained.metrics, "train_seconds": trained.seconds}, indent=2))
    (out / FILES["history"]).write_text(json.dumps(trained.history, indent=2))
    return out


def load_checkpoint(directory: str | Path, catalog: pd.DataFrame, embeddings: np.ndarray) -> tuple[CRM, CRMConfig, FeatureSpace]:
    src = Path(directory)
    config = CRMConfig.model_validate_json((src / FILES["config"]).read_text())
    space = FeatureSpace.model_validate_json((src / FILES["features"]).read_text())
    model = build_crm(config, space, catalog, embeddings, load_file(src / FILES["weights"]))
    return model.eval(), config, space
