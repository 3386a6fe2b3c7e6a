"""Turn a prepared dataset back into per-user raw-id histories for the serving history store, and
a knowledge directory into the users' knowledge vector records.

The store speaks raw ids (what product services send), so dense ``user_idx``/``item_idx`` are
mapped back here. ``until_split`` cuts the global chronological order at the start of a split,
so an offline replay of that split sees exactly the history the model saw at training time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.history import KnowledgeRecord
from training.data.samples import SPLITS, PreparedData

UNTIL_SPLITS = ("all", "valid", "test")

UserRecords = tuple[str, np.ndarray, np.ndarray, np.ndarray, dict[str, str]]


def split_start_order(data: PreparedData, split: str) -> int | None:
    """The global ``order`` of the first interaction of ``split`` (None for "all").

    Recomputed from the recorded ratios the same way ``prepare`` cut them, then checked against
    the samples so a change in the split protocol cannot silently leak later events.
    """
    if split not in UNTIL_SPLITS:
        raise ValueError(f"until_split must be one of {', '.join(UNTIL_SPLITS)}, got {split!r}")
    if split == "all":
        return None
    n = int(data.meta["n_interactions"])
    ratios = data.meta["ratios"]
    cut = int(round(n * sum(ratios[: SPLITS.index(split)])))
    order, names = data.samples["order"].to_numpy(), data.samples["split"].astype(str).to_numpy()
    later = np.isin(names, SPLITS[SPLITS.index(split):])
    if (order[later] < cut).any() or (order[~later] >= cut).any():
        raise ValueError(f"split boundary {cut} disagrees with the samples' splits: re-run `reclora prepare`")
    return cut


def histories_from_prepared(data: PreparedData, *, until_split: str = "all") -> Iterator[UserRecords]:
    """Yield (user_id, items, ratings, timestamps, profile) per user, raw ids, oldest first.

    Every user of ``data.users`` is yielded, also those without events before the cut, so their
    profile is loaded; profile = every user column except the ids, as strings.
    """
    cut = split_start_order(data, until_split)
    events = data.events
    if cut is not None:
        events = events[events["order"].to_numpy() < cut]
    user_idx = events["user_idx"].to_numpy(np.int64)
    raw_item = np.zeros(int(data.items["item_idx"].max()) + 1 if len(data.items) else 1, dtype=np.int64)
    raw_item[data.items["item_idx"].to_numpy(np.int64)] = data.items["item"].to_numpy(np.int64)
    items = raw_item[events["item_idx"].to_numpy(np.int64)]
    ratings = events["rating"].to_numpy(np.float32)
    timestamps = events["timestamp"].to_numpy(np.int64)

    users = data.users.sort_values("user_idx")
    profile_cols = [c for c in users.columns if c not in ("user", "user_idx")]
    idx = users["user_idx"].to_numpy(np.int64)
    starts = np.searchsorted(user_idx, idx, side="left")  # events are sorted by user, then order
    ends = np.searchsorted(user_idx, idx, side="right")
    profiles = users[profile_cols].astype(str).to_dict("records")
    for raw_user, start, end, profile in zip(users["user"].tolist(), starts, ends, profiles):
        yield str(raw_user), items[start:end], ratings[start:end], timestamps[start:end], profile


def knowledge_records(data: PreparedData, directory: str | Path, *,
                      until_split: str = "all") -> list[tuple[str, KnowledgeRecord | None]]:
    """(user_id, record) per user of ``data`` from a knowledge directory (``reclora knowledge``);
    None for a user without a vector. Checked against ``data`` before anything is returned
    (``KnowledgeError``, a ValueError, saying why).

    A record's ``events_at`` is the number of the user's events loaded (up to ``until_split``)
    before the knowledge's cutoff (user prompts read the events strictly before it): the history
    its text was generated from, so the nearline refresh counts only later events. Without a
    cutoff, every loaded event. ``generated_at`` is
    the directory's ``generated_at`` (Unix seconds), else the time its vectors were written.
    """
    from training.crm.knowledge import FILES, load_knowledge

    arrays = load_knowledge(directory, data)
    config = arrays.config
    generated_at = float(arrays.meta.get("generated_at") or (Path(directory) / FILES["user_vectors"]).stat().st_mtime)
    cut = split_start_order(data, until_split)
    events = data.events
    keep = np.ones(len(events), dtype=bool) if cut is None else events["order"].to_numpy() < cut
    if config.cutoff_timestamp is not None:
        keep &= events["timestamp"].to_numpy(np.int64) < int(config.cutoff_timestamp)
    counts = np.bincount(events["user_idx"].to_numpy(np.int64)[keep], minlength=len(arrays.user_vectors))
    users = data.users.sort_values("user_idx")
    out: list[tuple[str, KnowledgeRecord | None]] = []
    for raw_user, idx in zip(users["user"].tolist(), users["user_idx"].to_numpy(np.int64)):
        record = None
        if arrays.user_has[idx]:
            record = KnowledgeRecord(arrays.user_vectors[idx], config.encoder, int(counts[idx]), generated_at)
        out.append((str(raw_user), record))
    return out
