"""Prototype adapters for a bundle: the training users' gate outputs clustered into P groups.

Each training user is represented by the gate outputs of the user's latest training sample (the
history the user is served from), all modules' mixture weights concatenated: (n_modules * n_meta).
Seeded k-means on these vectors gives P centroids; each centroid is again a mixture per module
(a mean of softmax outputs), and the prototype's adapter is the meta-LoRAs mixed by it:
A_p = sum_k c_k A_k, B_p = sum_k c_k B_k, per module. That is exactly the adapter of a user whose
gate outputs equal the centroid, and the mean of the cluster's A_u and of its B_u (mixing is
linear in the weights). It is not the mean of the cluster's updates A_u B_u, which is bilinear,
has rank above r and is no LoRA at all; a user at the centroid is the one case that is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from service.bundle import BundleError
from service.bundle import prototypes as parts
from service.bundle.writer import BundleWriter
from service.llm.personalized_lora import AdapterMixer, peft_config, peft_weights

KIND = "gate-kmeans"


@dataclass(frozen=True)
class PrototypeOptions:
    """``count`` prototypes (0: exact per-user adapters, none exported), k-means seeded by ``seed``."""

    count: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"--prototypes must be 0 (exact adapters) or more, got {self.count}")


@dataclass(frozen=True)
class Prototypes:
    centroids: np.ndarray  # (P, n_modules * n_meta) float32
    sizes: np.ndarray  # (P,) training users per prototype
    inertia: float  # sum of squared distances of the users to their centroids


def latest_per_user(samples: pd.DataFrame) -> pd.DataFrame:
    """Each user's latest sample (longest history), users in id order."""
    order = samples.sort_values(["user_idx", "hist_end", "order"] if "order" in samples else ["user_idx", "hist_end"])
    return order.groupby("user_idx", sort=True).tail(1).reset_index(drop=True)


def gate_features(mixer: AdapterMixer, user_reps: torch.Tensor) -> np.ndarray:
    """(N, n_modules * n_meta) every module's gate output per user, concatenated in module order."""
    return mixer.gate_outputs(user_reps).reshape(len(user_reps), -1).numpy().astype(np.float32)


def fit_prototypes(features: np.ndarray, options: PrototypeOptions) -> Prototypes:
    """Seeded k-means (k-means++ starts, 10 restarts, on float64): the same features and seed give
    the same centroids."""
    from sklearn.cluster import KMeans

    distinct = len(np.unique(np.round(features, 6), axis=0))
    if options.count > distinct:
        raise BundleError(f"--prototypes {options.count}: the training users have only {distinct} distinct "
                          "gate outputs; ask for at most that many")
    kmeans = KMeans(n_clusters=options.count, random_state=options.seed, n_init=10)
    labels = kmeans.fit_predict(features.astype(np.float64))
    centroids = kmeans.cluster_centers_.astype(np.float32)
    return Prototypes(centroids, np.bincount(labels, minlength=options.count), float(kmeans.inertia_))


def add_prototypes(writer: BundleWriter, mixer: AdapterMixer, user_reps: torch.Tensor, options: PrototypeOptions,
                   base_model: str = "") -> Prototypes:
    """Cluster the users' gate outputs and write the centroids and one PEFT adapter per prototype."""
    if not mixer.cfg.gated:
        raise BundleError("prototypes need a gated (personalized) LoRA: a shared LoRA is one adapter already")
    fitted = fit_prototypes(gate_features(mixer, user_reps), options)
    n_modules, n_meta = len(mixer.module_names), mixer.cfg.n_meta
    writer.add_npy(parts.CENTROIDS, fitted.centroids)
    targets = sorted({name.rsplit(".", 1)[-1] for name in mixer.module_names})
    config = peft_config(mixer.cfg.r, mixer.cfg.scaling, targets, base_model)
    for i, centroid in enumerate(fitted.centroids):
        mixed = mixer.adapter(torch.from_numpy(centroid).reshape(n_modules, n_meta))
        writer.add_safetensors(parts.weights_path(i), peft_weights(mixed))
        writer.add_json(parts.config_path(i), config)
    writer.set_component(parts.COMPONENT, kind=KIND, config={
        "count": options.count, "seed": options.seed, "users": len(user_reps), "features": n_modules * n_meta,
        "sizes": [int(n) for n in fitted.sizes], "inertia": fitted.inertia})
    return fitted
