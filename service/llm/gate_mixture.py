"""What a user's gates chose, in a form a person can read: the meta-LoRAs with the largest weights,
per layer group (every target module of one transformer layer, their weights averaged) and
averaged over every module.

A personalized LoRA has one gate per target module, each a softmax over the ``n_meta`` meta-LoRAs
(``AdapterMixer.mixtures``: n_modules x n_meta); hundreds of numbers say little, the few largest
weights of each layer say which meta-LoRAs make the user's adapter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MetaWeight:
    """One meta-LoRA (its index in the banks) and its gate weight."""

    meta_lora: int
    weight: float


@dataclass(frozen=True)
class GroupMixture:
    """The largest weights of a group of modules' gates (their mean), heaviest first."""

    group: str
    modules: int
    top: tuple[MetaWeight, ...]


@dataclass(frozen=True)
class GateMixture:
    """A user's mixture: averaged over every module, and per layer group in layer order."""

    n_meta: int
    averaged: GroupMixture
    layers: tuple[GroupMixture, ...]


def layer_group(module_name: str) -> str:
    """``layers.<i>`` for a module of transformer layer i, else the module's own name."""
    match = _LAYER.search(module_name)
    return f"layers.{match.group(1)}" if match else module_name


def top_weights(weights: np.ndarray, k: int) -> tuple[MetaWeight, ...]:
    """The ``k`` largest of one mixture's weights, heaviest first (ties: the lower index first)."""
    order = np.lexsort((np.arange(len(weights)), -weights))[:k]
    return tuple(MetaWeight(int(i), float(weights[i])) for i in order)


def gate_mixture(module_names: Sequence[str], alphas: np.ndarray, top_k: int) -> GateMixture:
    """Summarize ``alphas`` (n_modules x n_meta, rows in ``module_names`` order) as the top ``top_k``
    meta-LoRAs averaged over every module and per layer group."""
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 2 or alphas.shape[0] != len(module_names):
        raise ValueError(f"alphas {alphas.shape} do not match {len(module_names)} modules")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(module_names):
        groups.setdefault(layer_group(name), []).append(row)

    def order(group: str) -> tuple[int, int | str]:
        match = re.fullmatch(r"layers\.(\d+)", group)
        return (0, int(match.group(1))) if match else (1, group)

    layers = tuple(GroupMixture(g, len(rows), top_weights(alphas[rows].mean(0), top_k))
                   for g, rows in sorted(groups.items(), key=lambda kv: order(kv[0])))
    averaged = GroupMixture("all", len(module_names), top_weights(alphas.mean(0), top_k))
    return GateMixture(alphas.shape[1], averaged, layers)
