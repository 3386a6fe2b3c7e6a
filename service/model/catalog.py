"""Raw item ids <-> dense ids, item texts and semantic embeddings from a bundle's catalog."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from service.llm.prompt import ItemText


SUPPORT_COLUMN = "train_interactions"  # an item's interactions in the training data; read by fusions by support


class Catalog:
    def __init__(self, items: pd.DataFrame, embeddings: np.ndarray) -> None:
        if len(items) and int(items["item_idx"].max()) >= len(embeddings):
            raise ValueError("the item embeddings do not cover the catalog")
        self.items = items
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        raw = items["item"].to_numpy(np.int64)
        dense = items["item_idx"].to_numpy(np.int64)
        self._order = np.argsort(raw)
        self._raw_sorted = raw[self._order]
        self._dense_sorted = dense[self._order]
        self._raw_of = dict(zip(dense.tolist(), raw.tolist()))
        years = items["year"] if "year" in items else pd.Series([None] * len(items))
        self.support: np.ndarray | None = None  # by dense id; None where the catalog does not record it
        if SUPPORT_COLUMN in items:
            self.support = np.zeros(len(self.embeddings), np.int64)
            self.support[dense] = items[SUPPORT_COLUMN].to_numpy(np.int64)
        self.texts = {int(i): ItemText(str(t), None if pd.isna(y) else int(y))
                      for i, t, y in zip(dense, items["title"], years)}

    def __len__(self) -> int:
        return len(self.items)

    def to_dense(self, raw_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Dense ids for raw ids; 0 where the raw id is not in the catalog."""
        raw = np.asarray(list(raw_ids) if not isinstance(raw_ids, np.ndarray) else raw_ids, dtype=np.int64)
        pos = np.searchsorted(self._raw_sorted, raw)
        pos = np.minimum(pos, len(self._raw_sorted) - 1) if len(self._raw_sorted) else pos
        found = (len(self._raw_sorted) > 0) & (self._raw_sorted[pos] == raw) if len(raw) else np.zeros(0, bool)
        return np.where(found, self._dense_sorted[pos] if len(raw) else 0, 0).astype(np.int64)

    def to_raw(self, dense_id: int) -> int:
        """The raw id of a dense id of the catalog (KeyError for one it does not hold)."""
        return self._raw_of[int(dense_id)]

    def unknown(self, raw_ids: Iterable[int]) -> list[int]:
        ids = list(raw_ids)
        return [r for r, d in zip(ids, self.to_dense(ids)) if d == 0]
