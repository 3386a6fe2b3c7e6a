"""A byte-bounded LRU of materialized user adapters, keyed by user and bundle version.

A cached adapter is reused while the user's mixture weights stay within ``drift_tol`` (max
absolute difference) of the ones it was built from; new history moves the CRM representation,
and only a real move of the mixture is worth re-materializing for. Keying by bundle version
means an activation never serves a stale adapter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.engine.base import UserAdapter


@dataclass
class CacheEvents:
    """Hooks for metrics: ``hit``, ``miss`` and ``evict`` with no arguments, ``size`` with the bytes
    held after every change."""

    hit: Callable[[], None] = lambda: None
    miss: Callable[[], None] = lambda: None
    evict: Callable[[], None] = lambda: None
    size: Callable[[int], None] = lambda nbytes: None


class AdapterCache:
    def __init__(self, max_bytes: int, drift_tol: float = 0.02, events: CacheEvents | None = None) -> None:
        self.max_bytes = max_bytes
        self.drift_tol = drift_tol
        self.events = events or CacheEvents()
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
                    float((entry[0] - alphas).abs().max()) <= self.drift_tol:
                self._entries.move_to_end(key)
                self.events.hit()
                return entry[1], True
        self.events.miss()
        adapter = build(alphas)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            if adapter.nbytes <= self.max_bytes:
                self._entries[key] = (alphas.clone(), adapter)
                self._bytes += adapter.nbytes
                while self._bytes > self.max_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self._bytes -= evicted.nbytes
                    self.events.evict()
            self.events.size(self._bytes)
        return adapter, False

    def drop_version(self, version: str) -> None:
        """Forget every adapter of a bundle version (after it is deactivated or deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == version]:
                self._bytes -= self._entries.pop(key)[1].nbytes
            self.events.size(self._bytes)
