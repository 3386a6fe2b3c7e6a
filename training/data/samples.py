"""Turn a raw dataset into labelled CTR samples with a leakage-free chronological split.

Protocol (ReLLa / RecLoRA): every interaction is a sample; label = rating > threshold; all
interactions are ordered globally by (timestamp, user, item) and cut 8:1:1 into train / valid /
test; a sample's history is every earlier interaction of the same user in that order; samples
with fewer than ``min_history`` history items are dropped.

Histories are not copied per sample: ``events`` holds each user's interactions in order and a
sample points at its history with ``hist_end`` (exclusive index into ``events``) and
``hist_len``, so the history is ``events[hist_end - hist_len : hist_end]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.schema import RawDataset

SPLITS = ("train", "valid", "test")
FILES = {
    "items": "items.parquet",
    "users": "users.parquet",
    "events": "events.parquet",
    "samples": "samples.parquet",
    "meta": "meta.json",
}


@dataclass(frozen=True)
class SplitConfig:
    label_threshold: float = 3.0
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_history: int = 5


@dataclass
class PreparedData:
    """Dense-id tables: item_idx and user_idx start at 1 (0 is padding everywhere)."""

    items: pd.DataFrame  # item_idx, item (raw id), title, genres, year, extra text columns
    users: pd.DataFrame  # user_idx, user (raw id), profile columns
    events: pd.DataFrame  # user_idx, item_idx, rating, timestamp, order; sorted by user, order
    samples: pd.DataFrame  # order, user_idx, item_idx, rating, timestamp, label, split, hist_end, hist_len
    meta: dict

    def split(self, name: str) -> pd.DataFrame:
        return self.samples[self.samples["split"] == name].reset_index(drop=True)

    def history(self, sample: pd.Series | dict) -> pd.DataFrame:
        end = int(sample["hist_end"])
        return self.events.iloc[end - int(sample["hist_len"]) : end]

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for key in ("items", "users", "events", "samples"):
            getattr(self, key).to_parquet(out / FILES[key], index=False)
        (out / FILES["meta"]).write_text(json.dumps(self.meta, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "PreparedData":
        src = Path(directory)
        missing = [name for name in FILES.values() if not (src / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{src} is not a prepared dataset: missing {', '.join(missing)}")
        tables = {k: pd.read_parquet(src / FILES[k]) for k in ("items", "users", "events", "samples")}
        return cls(**tables, meta=json.loads((src / FILES["meta"]).read_text()))


def _dense_ids(raw: pd.Series) -> dict[int, int]:
    return {int(v): i + 1 for i, v in enumerate(sorted(raw.unique()))}


def prepare(dataset: RawDataset, config: SplitConfig = SplitConfig()) -> PreparedData:
    """Label, order, split and index ``dataset``; see the module docstring for the protocol."""
    if not np.isclose(sum(config.ratios), 1.0):
        raise ValueError(f"split ratios must sum to 1, got {config.ratios}")
    inter = dataset.interactions
    item_map = _dense_ids(dataset.items["item"])
    user_ids = pd.concat([inter["user"], dataset.users["user"]]) if len(dataset.users) else inter["user"]
    user_map = _dense_ids(user_ids)

    items = dataset.items.copy()
    items.insert(0, "item_idx", items["item"].map(item_map).astype("int32"))
    items = items.sort_values("item_idx").reset_index(drop=True)
    users = pd.DataFrame({"user": sorted(user_map, key=user_map.get)})
    users.insert(0, "user_idx", users["user"].map(user_map).astype("int32"))
    if len(dataset.users):
        users = users.merge(dataset.users, on="user", how="left")
    users = users.fillna("unknown")

    ordered = inter.sort_values(["timestamp", "user", "item"], kind="stable").reset_index(drop=True)
    n = len(ordered)
    frame = pd.DataFrame(
        {
            "order": np.arange(n, dtype=np.int64),
            "user_idx": ordered["user"].map(user_map).to_numpy(np.int32),
            "item_idx": ordered["item"].map(item_map).to_numpy(np.int32),
            "rating": ordered["rating"].to_numpy(np.float32),
            "timestamp": ordered["timestamp"].to_numpy(np.int64),
        }
    )
    cut1 = int(round(n * config.ratios[0]))
    cut2 = int(round(n * (config.ratios[0] + config.ratios[1])))
    split = np.full(n, "test", dtype=object)
    split[:cut1], split[cut1:cut2] = "train", "valid"
    frame["label"] = (frame["rating"] > config.label_threshold).astype(np.int8)
    frame["split"] = pd.Categorical(split, categories=list(SPLITS))

    # Events sorted by user then global order; a sample's history ends right before it.
    events = frame.sort_values(["user_idx", "order"], kind="stable").reset_index(drop=True)
    position = events.groupby("user_idx").cumcount().to_numpy()
    events_index = np.arange(len(events))
    per_order = np.empty(n, dtype=np.int64)
    per_order[events["order"].to_numpy()] = events_index
    hist_len = np.empty(n, dtype=np.int64)
    hist_len[events["order"].to_numpy()] = position
    frame["hist_end"] = per_order
    frame["hist_len"] = hist_len

    samples = frame[frame["hist_len"] >= config.min_history].reset_index(drop=True)
    meta = {
        "dataset": dataset.name,
        "rating_min": dataset.rating_min,
        "rating_max": dataset.rating_max,
        **dataset.words.meta(),
        "dropped_rows": {reason: int(n) for reason, n in dataset.dropped_rows.items()},
        "label_threshold": config.label_threshold,
        "ratios": list(config.ratios),
        "min_history": config.min_history,
        "n_users": len(users),
        "n_items": len(items),
        "n_interactions": n,
        "split_timestamps": {
            "valid_start": int(frame["timestamp"].iloc[cut1]) if cut1 < n else None,
            "test_start": int(frame["timestamp"].iloc[cut2]) if cut2 < n else None,
        },
        "n_samples": {s: int((samples["split"] == s).sum()) for s in SPLITS},
        "positive_rate": {
            s: float(samples.loc[samples["split"] == s, "label"].mean()) for s in SPLITS
        },
    }
    return PreparedData(
        items=items,
        users=users,
        events=events[["user_idx", "item_idx", "rating", "timestamp", "order"]],
        samples=samples,
        meta=meta,
    )
