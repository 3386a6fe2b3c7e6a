"""A byte-bounded LRU of materialized user adapters, keyed by user and bundle version.

A cached adapter is reused while the user's mixture weights stay within ``adapter_drift_tol`` (max
absolute difference) of the ones it was built from; new history moves the CRM representation,
and only a real move of the mixture is worth re-materializing for. Keying by bundle version
means an activation never serves a stale adapter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum

import torch

from service.config import AdapterCacheSettings
from service.engine.base import UserAdapter
from service.telemetry import NO_TELEMETRY, Quantity, Telemetry


class AdapterCacheOutcome(StrEnum):
    """A lookup's outcome, or an adapter evicted to stay within the byte bound."""

    HIT = "hit"
    MISS = "miss"  # absent or drifted: materialized
    EVICT = "evict"


class AdapterCache:
    def __init__(self, settings: AdapterCacheSettings | None = None, telemetry: Telemetry = NO_TELEMETRY) -> None:
        self.settings = settings or AdapterCacheSettings()
        self.telemetry = telemetry
        self._entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, UserAdapter]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_build(self, user_id: str, version: str, alphas: torch.Tensor,
                     build: Callable[[torch.Tensor], UserAdapter]) -> tuple[UserAdapter, bool]:
        """The user's adapter for these mixture weights, and whether it came from the cache."""
        key = (version, user_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0].shape == alphas.shape and \
                    float((entry[0] - alphas).abs().max()) <= self.settings.adapter_drift_tol:
                self._entries.move_to_end(key)
                self.telemetry.count(AdapterCacheOutcome.HIT)
                return entry[1], True
        self.telemetry.count(AdapterCacheOutcome.MISS)
        adapter = build(alphas)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            if adapter.nbytes <= self.settings.adapter_cache_bytes:
                self._entries[key] = (alphas.clone(), adapter)
                self._bytes += adapter.nbytes
                while self._bytes > self.settings.adapter_cache_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self._bytes -= evicted.nbytes
                    self.telemetry.count(AdapterCacheOutcome.EVICT)
            self.telemetry.measure(Quantity.ADAPTER_CACHE_BYTES, self._bytes)
        return adapter, False

    def drop_version(self, version: str) -> None:
        """Forget every adapter of a bundle version (after it is deactivated or deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == version]:
                self._bytes -= self._entries.pop(key)[1].nbytes
            self.telemetry.measure(Quantity.ADAPTER_CACHE_BYTES, self._bytes)
