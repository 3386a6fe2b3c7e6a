"""One table, one split protocol: item popularity, logistic regression and the CRM side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from training.baselines import LogisticBaseline, popularity_scores
from training.crm.checkpoint import load_checkpoint, load_user_knowledge
from training.crm.dataset import encode_split
from training.crm.train import predict
from training.data.samples import PreparedData
from training.metrics import binary_metrics

SPLITS = ("valid", "test")


def evaluate_crm_and_baselines(data_dir: Path, crm_dir: Path, embeddings: np.ndarray) -> list[dict]:
    """Rows of {model, split, auc, logloss, acc, n, seconds} on the valid and test splits."""
    data = PreparedData.load(data_dir)
    labels = {s: data.split(s)["label"].to_numpy() for s in SPLITS}
    rows: list[dict] = []

    def add(model: str, predict_split, seconds_fit: float = 0.0) -> None:
        for split in SPLITS:
            start = time.perf_counter()
            probs = predict_split(split)
            rows.append({"model": model, "split": split, **binary_metrics(labels[split], probs),
                         "seconds": seconds_fit + time.perf_counter() - start})

    add("item popularity", lambda s: popularity_scores(data, s))
    start = time.perf_counter()
    logistic = LogisticBaseline(data).fit()
    add("logistic regression", logistic.predict, time.perf_counter() - start)
    model, config, space = load_checkpoint(crm_dir, data.items, embeddings)
    emb, users = torch.from_numpy(np.asarray(embeddings, np.float32)), load_user_knowledge(crm_dir)
    add("CRM (SIM search + DIN)", lambda s: predict(model, encode_split(data, s, space, config, emb, progress=False,
                                                                        user_knowledge=users)))
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | split | AUC | LogLoss | ACC | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['split']} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['acc']:.4f} | {r['n']} |")
    return "\n".join(lines)


def write_report(rows: list[dict], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(rows)
    (out_dir / "report.md").write_text(md + "\n")
    (out_dir / "report.json").write_text(json.dumps(rows, indent=2))
    return md
