"""Per-user adapters on vLLM servers: write, load, track, evict, delete.

A user's adapter is written as a standard PEFT directory under an adapter root that the servers
read too (a shared volume), then registered on a server with POST /v1/load_lora_adapter. Its name
is ``<user>.<bundle version>.<content hash>``: vLLM keys its prefix cache on the adapter name, so
a name must never be reused for other weights (two adapters under one name would share cached
keys/values). The hash is of the written weights themselves, so equal weights share a name
(a repeated load is harmless) and different weights never do.

Each server holds at most ``capacity`` of them (size it to the server's ``--max-cpu-loras``):
beyond that the least recently used one that no request is using is unregistered, and its files
are deleted once no server holds it.

Prototype adapters (a version's finite set, shared by all its users) are pinned instead: loaded
on every replica when the version is activated, outside the capacity, never evicted while their
version is one of the last ``PINNED_VERSIONS`` pinned, and loaded again on a replica that comes
back; so scoring by prototype loads no adapter.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from service.config import VLLMSettings
from service.engine.base import UserAdapter
from service.engine.vllm.client import VLLMClient
from service.llm.personalized_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_config, peft_weights
from service.telemetry import NO_TELEMETRY, Quantity, Telemetry

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
PINNED_VERSIONS = 2  # versions whose prototypes stay pinned: the active one and the one before (or a canary)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}\.[A-Za-z0-9_-]{1,40}\.[0-9a-f]{16}$")


def sanitize(text: str, limit: int = 40) -> str:
    """A path- and URL-safe rendering of ``text`` (the hash, not this, makes names unique)."""
    return _UNSAFE.sub("_", text)[:limit] or "_"


def split_key(adapter: UserAdapter) -> tuple[str, str]:
    """(user, bundle version) of an adapter keyed ``user@version#digest`` (user ids may hold '@')."""
    body = adapter.key.rpartition("#")[0] or adapter.key
    user, _, version = body.rpartition("@")
    return (adapter.user_id or user or body), version


@dataclass(frozen=True)
class AdapterFiles:
    name: str
    path: Path  # the directory on the gateway's side


class ReplicaAdapterOutcome(StrEnum):
    """An adapter loaded onto a replica, or unloaded from it to stay within capacity (counted on
    the replica's URL)."""

    LOADED = "loaded"
    EVICTED = "evicted"


class AdapterWriter:
    """Writes user adapters as PEFT directories under ``root``.

    ``server_root`` is where the servers see the same directory, when they mount it elsewhere.
    """

    def __init__(self, root: str | Path, *, base_model: str, server_root: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_model = base_model
        self.server_root = server_root.rstrip("/") if server_root else None

    def write(self, adapter: UserAdapter) -> AdapterFiles:
        """Write (or find already written) the adapter's directory; the name hashes the weights."""
        from safetensors.torch import save

        weights = save({k: v.float().contiguous() for k, v in sorted(peft_weights(adapter.weights).items())})
        config = json.dumps(adapter_config(adapter, self.base_model), indent=2, sort_keys=True).encode()
        digest = hashlib.sha256(weights + b"\0" + config).hexdigest()[:16]
        user, version = split_key(adapter)
        name = f"{sanitize(user)}.{sanitize(version)}.{digest}"
        files = AdapterFiles(name, self.root / name)
        if not (files.path / ADAPTER_WEIGHTS).is_file():
            # Written aside, then renamed: a server never reads a half-written adapter.
            scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            (scratch / ADAPTER_WEIGHTS).write_bytes(weights)
            (scratch / ADAPTER_CONFIG).write_bytes(config)
            scratch.chmod(0o755)  # the server may run as another user
            try:
                scratch.rename(files.path)
            except OSError:  # written meanwhile by another thread: same name, same content
                shutil.rmtree(scratch, ignore_errors=True)
        return files

    def server_path(self, files: AdapterFiles) -> str:
        return f"{self.server_root}/{files.name}" if self.server_root else str(files.path)

    def delete(self, files: AdapterFiles) -> None:
        shutil.rmtree(files.path, ignore_errors=True)


def adapter_config(adapter: UserAdapter, base_model: str) -> dict:
    """adapter_config.json of a materialized user adapter (rank and alpha from its weights)."""
    first_a, _ = next(iter(adapter.weights.values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapter.weights})
    return peft_config(int(first_a.shape[1]), adapter.scaling, targets, base_model)


class AdapterLifecycle:
    """What every replica holds, kept within ``capacity`` per replica, least recently used out first.

    One lock serializes loads and evictions (a load takes milliseconds; the pipeline scores one
    request at a time anyway), so bookkeeping and the servers never disagree mid-change.
    """

    def __init__(self, writer: AdapterWriter, capacity: int, *, load_timeout_s: float = 10.0,
                 telemetry: Telemetry = NO_TELEMETRY, max_known: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.writer = writer
        self.capacity = capacity
        self.load_timeout_s = load_timeout_s
        self.telemetry = telemetry
        self._max_known = max_known
        self._known: OrderedDict[tuple[str, int], AdapterFiles] = OrderedDict()  # (key, id) -> files
        self._resident: dict[str, OrderedDict[str, AdapterFiles]] = {}
        self._in_use: Counter[tuple[str, str]] = Counter()
        self._pinned: OrderedDict[str, list[UserAdapter]] = OrderedDict()  # version -> its prototype adapters
        self._lock = threading.RLock()

    @classmethod
    def from_settings(cls, settings: VLLMSettings, *, base_model: str,
                      telemetry: Telemetry = NO_TELEMETRY) -> "AdapterLifecycle":
        """Adapters written under ``vllm_adapter_dir``, ``vllm_max_adapters`` kept per replica."""
        writer = AdapterWriter(settings.vllm_adapter_dir, base_model=base_model,
                               server_root=settings.vllm_adapter_server_dir)
        return cls(writer, settings.vllm_max_adapters, load_timeout_s=settings.vllm_load_timeout_s,
                   telemetry=telemetry)

    @contextmanager
    def lease(self, replica: str, client: VLLMClient, adapter: UserAdapter,
              deadline: float | None = None) -> Iterator[str]:
        """The adapter's name, loaded on ``replica`` and protected from eviction while in use."""
        with self._lock:
            files = self._files(adapter)
            held = self._resident.setdefault(replica, OrderedDict())
            if files.name in held:
                held.move_to_end(files.name)
            else:
                timeout = self.load_timeout_s if deadline is None else \
                    min(self.load_timeout_s, deadline - time.perf_counter())
                self._make_room(replica, client, timeout)
                files = self._load(replica, client, adapter, files, timeout)
            self._in_use[(replica, files.name)] += 1
        try:
            yield files.name
        finally:
            with self._lock:
                self._in_use[(replica, files.name)] -= 1
                if self._in_use[(replica, files.name)] <= 0:
                    del self._in_use[(replica, files.name)]
                    if files.name not in self._resident.get(replica, {}):  # forgotten meanwhile
                        self._delete_if_unused(files)

    def pin(self, version: str, adapters: Sequence[UserAdapter]) -> None:
        """Keep ``version``'s prototype adapters loaded (``load_pinned`` loads them on a replica);
        the versions pinned before the last ``PINNED_VERSIONS`` become ordinary, evictable ones."""
        with self._lock:
            self._pinned.pop(version, None)
            self._pinned[version] = list(adapters)
            while len(self._pinned) > PINNED_VERSIONS:
                self._pinned.popitem(last=False)

    def pinned(self) -> list[UserAdapter]:
        """Every pinned adapter, oldest version first."""
        with self._lock:
            return [a for adapters in self._pinned.values() for a in adapters]

    def load_pinned(self, replica: str, client: VLLMClient, timeout_s: float | None = None) -> int:
        """Load every pinned adapter ``replica`` lacks; how many were loaded."""
        loaded = 0
        with self._lock:
            held = self._resident.setdefault(replica, OrderedDict())
            for adapter in self.pinned():
                files = self._files(adapter)
                if files.name in held:
                    continue
                self._load(replica, client, adapter, files, self.load_timeout_s if timeout_s is None else timeout_s)
                loaded += 1
        return loaded

    def forget(self, replica: str, name: str | None = None) -> None:
        """The server lost ``name`` (or, with None, everything: it is down or restarted)."""
        with self._lock:
            held = self._resident.setdefault(replica, OrderedDict())
            for gone in ([name] if name is not None else list(held)):
                files = held.pop(gone, None)
                if files is not None:
                    self._delete_if_unused(files)
            self.telemetry.measure(Quantity.REPLICA_ADAPTERS_RESIDENT, len(held), on=replica)

    def adopt(self, replica: str, names: Iterable[str]) -> None:
        """Count adapters the server already holds (from an earlier gateway run) against its
        capacity, so they are evicted in turn; names not in this engine's pattern are left alone."""
        with self._lock:
            held = self._resident.setdefault(replica, OrderedDict())
            for name in names:
                if NAME_PATTERN.match(name) and name not in held:
                    held[name] = AdapterFiles(name, self.writer.root / name)
                    held.move_to_end(name, last=False)  # least recently used: first to go
            self.telemetry.measure(Quantity.REPLICA_ADAPTERS_RESIDENT, len(held), on=replica)

    def resident(self, replica: str) -> list[str]:
        """Names held on ``replica``, least recently used first."""
        with self._lock:
            return list(self._resident.get(replica, {}))

    def _files(self, adapter: UserAdapter) -> AdapterFiles:
        # Keyed by the adapter object too: its key names user, version and mixture, the object
        # its exact tensors; either changing means new weights, hence a new write and hash.
        key = (adapter.key, id(adapter.weights))
        files = self._known.get(key)
        if files is None:
            files = self.writer.write(adapter)
            self._known[key] = files
            while len(self._known) > self._max_known:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(key)
        return files

    def _load(self, replica: str, client: VLLMClient, adapter: UserAdapter, files: AdapterFiles,
              timeout_s: float) -> AdapterFiles:
        """Register ``adapter`` on ``replica`` (its files written again if they were deleted)."""
        held = self._resident.setdefault(replica, OrderedDict())
        if not (files.path / ADAPTER_WEIGHTS).is_file():  # deleted after an eviction elsewhere
            files = self.writer.write(adapter)
        started = time.perf_counter()
        client.load_adapter(files.name, self.writer.server_path(files), timeout_s)
        self.telemetry.count(ReplicaAdapterOutcome.LOADED, on=replica)
        self.telemetry.measure(Quantity.REPLICA_ADAPTER_LOAD_S, time.perf_counter() - started, on=replica)
        held[files.name] = files
        self.telemetry.measure(Quantity.REPLICA_ADAPTERS_RESIDENT, len(held), on=replica)
        return files

    def _pinned_names(self) -> set[str]:
        return {self._files(a).name for a in self.pinned()}

    def _make_room(self, replica: str, client: VLLMClient, timeout_s: float) -> None:
        held = self._resident[replica]
        pinned = self._pinned_names()
        for name in list(held):
            if len(held.keys() - pinned) < self.capacity:
                return
            if self._in_use[(replica, name)] or name in pinned:
                continue  # a request is scoring with it (never pull it from under that request), or pinned
            client.unload_adapter(name, timeout_s)
            files = held.pop(name)
            self.telemetry.count(ReplicaAdapterOutcome.EVICTED, on=replica)
            self._delete_if_unused(files)
        # Every held adapter is in use: go above capacity for now rather than fail the request.

    def _delete_if_unused(self, files: AdapterFiles) -> None:
        if any(files.name in held for held in self._resident.values()) or files.name in self._pinned_names():
            return
        if any(name == files.name for _, name in self._in_use):
            return
        self.writer.delete(files)
