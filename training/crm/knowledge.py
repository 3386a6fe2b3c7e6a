"""A knowledge directory (from ``reclora knowledge``) as arrays the CRM trains on, checked first.

The directory holds ``item_vectors.npy`` (n_items+1, D), ``user_vectors.npy`` (n_users+1, D),
``user_has.npy`` (n_users+1,) and ``knowledge.json`` (encoder, dim, cutoff, prompts, generator);
rows are the prepared dataset's dense ids, row 0 is padding. A user without knowledge has a zero
row and ``user_has`` False: the CRM reads its default vector for them, as serving does for a user
whose vector is not stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from service.crm.knowledge import KnowledgeConfig
from training.data.samples import PreparedData

FILES = {"item_vectors": "item_vectors.npy", "user_vectors": "user_vectors.npy", "user_has": "user_has.npy",
         "meta": "knowledge.json"}


class KnowledgeError(ValueError):
    """A knowledge directory is missing, malformed or does not fit the dataset; the message says why."""


@dataclass
class KnowledgeArrays:
    item_vectors: np.ndarray  # (n_items + 1, D) float32
    user_vectors: np.ndarray  # (n_users + 1, D) float32
    user_has: np.ndarray  # (n_users + 1,) bool
    meta: dict  # knowledge.json

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def config(self) -> KnowledgeConfig:
        return KnowledgeConfig.model_validate(self.meta)

    def user_default(self) -> np.ndarray:
        """(D,) the mean vector of the users who have one (they all have training history)."""
        has = self.user_has.astype(bool)
        if not has.any():
            return np.zeros(self.dim, np.float32)
        return self.user_vectors[has].mean(0).astype(np.float32)

    def user_table(self) -> np.ndarray:
        """(n_users + 1, D) vectors by user_idx, zero (= use the default) where a user has none."""
        return np.where(self.user_has.astype(bool)[:, None], self.user_vectors, 0.0).astype(np.float32)

    def check(self, data: PreparedData | None = None, where: str = "knowledge") -> KnowledgeArrays:
        """Shapes, dtypes, finiteness and the meta's dim; against ``data`` also the row counts."""
        items, users, has = self.item_vectors, self.user_vectors, self.user_has
        for name, a in (("item_vectors", items), ("user_vectors", users)):
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
                raise KnowledgeError(f"{where}: {name} must be a 2-d float array, got {a.dtype} {a.shape}")
            if not np.isfinite(a).all():
                raise KnowledgeError(f"{where}: {name} has non-finite values (NaN or infinity)")
        if users.shape[1] != items.shape[1]:
            raise KnowledgeError(f"{where}: user vectors are {users.shape[1]}-d, item vectors {items.shape[1]}-d")
        if has.dtype != np.bool_ or has.shape != (len(users),):
            raise KnowledgeError(f"{where}: user_has must be bool ({len(users)},) like the user vectors' rows, "
                                 f"got {has.dtype} {has.shape}")
        try:
            config = self.config
        except ValidationError as exc:
            raise KnowledgeError(f"{where}: {FILES['meta']} is not valid ({exc.errors()[0]['loc']}: "
                                 f"{exc.errors()[0]['msg']})") from None
        if config.dim != self.dim:
            raise KnowledgeError(f"{where}: {FILES['meta']} says dim {config.dim}, the vectors are {self.dim}-d")
        if data is not None:
            n_items, n_users = int(data.items["item_idx"].max()), int(data.users["user_idx"].max())
            if len(items) != n_items + 1:
                raise KnowledgeError(f"{where}: item_vectors has {len(items)} rows, the dataset needs "
                                     f"{n_items + 1} (n_items + 1): made for another dataset?")
            if len(users) != n_users + 1:
                raise KnowledgeError(f"{where}: user_vectors has {len(users)} rows, the dataset needs "
                                     f"{n_users + 1} (n_users + 1): made for another dataset?")
        return self


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KnowledgeError(f"{path}: cannot load array ({exc})") from None


def load_knowledge(directory: str | Path, data: PreparedData | None = None) -> KnowledgeArrays:
    """The knowledge in ``directory``, checked (and against ``data`` when given); KnowledgeError if not."""
    src = Path(directory)
    missing = [name for name in FILES.values() if not (src / name).is_file()]
    if missing:
        raise KnowledgeError(f"{src} is not a knowledge directory (see `reclora knowledge`): "
                             f"missing {', '.join(missing)}")
    try:
        meta = json.loads((src / FILES["meta"]).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise KnowledgeError(f"{src / FILES['meta']}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise KnowledgeError(f"{src / FILES['meta']}: must be a JSON object")
    arrays = KnowledgeArrays(
        item_vectors=_load_npy(src / FILES["item_vectors"]), user_vectors=_load_npy(src / FILES["user_vectors"]),
        user_has=_load_npy(src / FILES["user_has"]), meta=meta)
    arrays.check(data, where=str(src))
    arrays.item_vectors = arrays.item_vectors.astype(np.float32, copy=False)
    arrays.user_vectors = arrays.user_vectors.astype(np.float32, copy=False)
    return arrays
