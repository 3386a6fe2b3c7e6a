"""The frozen CRM's outputs that the LLM side reads: user vectors (the gates' input) and P(like).

A checkpoint is loaded once per caller (``FrozenCRM.load``) and each sample set encoded once
(``FrozenCRM.outputs``); the user vectors and the probabilities of a set both come from that one
encoding, each computed the first time it is asked for.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from service.crm.features import FeatureSpace
from service.crm.model import CRM, CRMConfig
from training.crm.checkpoint import load_checkpoint, load_user_knowledge
from training.crm.dataset import EncodedSplit, encode_samples
from training.crm.train import predict
from training.data.samples import PreparedData

CHUNK = 4096  # samples per CRM forward


class CRMOutputs:
    """One encoded sample set's user vectors, its candidates' item vectors and P(like)."""

    def __init__(self, model: CRM, encoded: EncodedSplit, items: np.ndarray | None = None) -> None:
        self._model, self._encoded, self._items = model, encoded, items

    @cached_property
    def user_reps(self) -> torch.Tensor:
        """(N, user_dim) frozen CRM user vectors."""
        with torch.no_grad():
            return torch.cat([self._model.user_representation(self._encoded.batch(idx)[0])
                              for idx in torch.arange(len(self._encoded)).split(CHUNK)])

    @cached_property
    def item_reps(self) -> torch.Tensor:
        """(N, item_dim) the frozen CRM's vector of each sample's candidate (``CRM.item_table``):
        what collaborative tokens read."""
        if self._items is None:
            raise ValueError("these CRM outputs were made without the samples' items")
        with torch.no_grad():
            return self._model.item_table()[torch.as_tensor(self._items, dtype=torch.long)].float()

    @cached_property
    def probabilities(self) -> np.ndarray:
        """(N,) the frozen CRM's P(like)."""
        return predict(self._model, self._encoded, CHUNK)


class FrozenCRM:
    """A CRM checkpoint, loaded once, with what encoding a dataset's samples for it takes."""

    def __init__(self, model: CRM, config: CRMConfig, space: FeatureSpace, user_knowledge: np.ndarray | None,
                 data: PreparedData, embeddings: np.ndarray) -> None:
        self.model, self.config, self.space = model, config, space
        self._user_knowledge, self._data = user_knowledge, data
        self._embeddings = torch.from_numpy(np.asarray(embeddings, np.float32))

    @classmethod
    def load(cls, crm_dir: Path, data: PreparedData, embeddings: np.ndarray) -> FrozenCRM:
        model, config, space = load_checkpoint(crm_dir, data.items, embeddings)
        return cls(model, config, space, load_user_knowledge(crm_dir), data, embeddings)

    def outputs(self, samples: pd.DataFrame) -> CRMOutputs:
        """``samples`` (rows of ``data``'s samples table) encoded once."""
        encoded = encode_samples(self._data, samples, self.space, self.config, self._embeddings, progress=False,
                                 user_knowledge=self._user_knowledge)
        return CRMOutputs(self.model, encoded, samples["item_idx"].to_numpy(np.int64))

    def draw_initial_weights(self, times: int) -> None:
        """Draw from the global torch generator what ``times`` constructions of this CRM draw (its
        random initial weights, which a checkpoint replaces). A seeded training run's later draws
        (the gates' dropout) follow one construction per CRM output the run reads, so a seed keeps
        naming the same run."""
        for _ in range(times):
            CRM(self.config)


def user_representations(data: PreparedData, samples: pd.DataFrame, crm_dir: Path,
                         embeddings: np.ndarray) -> torch.Tensor:
    """(N, user_dim) the checkpoint's user vectors of ``samples``, for a caller that reads nothing else."""
    return FrozenCRM.load(crm_dir, data, embeddings).outputs(samples).user_reps


def crm_probabilities(data: PreparedData, samples: pd.DataFrame, crm_dir: Path, embeddings: np.ndarray) -> np.ndarray:
    """(N,) the checkpoint's P(like) of ``samples``, for a caller that reads nothing else."""
    return FrozenCRM.load(crm_dir, data, embeddings).outputs(samples).probabilities
