"""A finite set of adapters that stands in for per-user ones: each user gets the adapter of the
prototype nearest to the user's gate outputs.

Exact personalization makes every user a distinct LoRA, which a vLLM server must load before it
can score that user. A bundle exported with prototypes carries P adapters (the meta-LoRAs mixed
by the centroids of the training users' gate outputs, ``training.export.prototypes``); serving
maps a user to the nearest centroid, so P adapters serve every user and can stay loaded on
every replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.bundle import Bundle
from service.bundle import prototypes as parts
from service.llm.personalized_lora import from_peft_weights


def nearest_centroids(alphas: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N,) the index of the centroid (P, n_modules * n_meta) nearest (Euclidean) to each of N users'
    gate outputs (N, n_modules, n_meta): the k-means assignment."""
    return torch.cdist(alphas.reshape(len(alphas), -1).to(centroids.dtype), centroids).argmin(1)


@dataclass(frozen=True)
class PrototypeSet:
    """P prototype adapters and the centroids that choose among them."""

    centroids: torch.Tensor  # (P, n_modules * n_meta): per module, the mixture weights
    weights: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ...]  # per prototype: module -> (A, B)
    digests: tuple[str, ...]  # per prototype, a hash of its weights file (names it for caches and servers)

    def __len__(self) -> int:
        return len(self.weights)

    def nearest(self, alphas: torch.Tensor) -> int:
        """The prototype whose centroid is nearest (Euclidean) to these gate outputs
        ((n_modules, n_meta), as ``AdapterMixer.mixtures`` gives them): the k-means assignment."""
        return int(nearest_centroids(alphas.unsqueeze(0), self.centroids)[0])

    @staticmethod
    def name(index: int) -> str:
        return parts.prototype_name(index)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> PrototypeSet | None:
        """The bundle's prototypes (the reader checked their count and shapes), or None without."""
        count = parts.prototype_count(bundle.manifest)
        if not count:
            return None
        centroids = torch.from_numpy(bundle.load_npy(parts.CENTROIDS).astype("float32"))
        weights, digests = [], []
        for i in range(count):
            mixed = from_peft_weights(bundle.load_safetensors(parts.weights_path(i)))
            weights.append({m: (a.float(), b.float()) for m, (a, b) in mixed.items()})
            digests.append(bundle.manifest.entry(parts.weights_path(i)).sha256[:12])
        return cls(centroids, tuple(weights), tuple(digests))
