"""Push, validate, activate, roll back and delete model versions on a running service.

One operation at a time (a lock): validation scores golden requests on the shared engine and
activation swaps the pipeline's model reference, so two pushes must not interleave. Scoring
traffic never waits for the lock: a request takes one snapshot of the active version when it
starts and finishes on it, so an activation neither drops nor mixes requests. New versions are
unpacked and validated in a private staging directory of the store and renamed into place only
when every check passed; a refused version never touches what is served.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.bundle import MANIFEST_NAME, BundleError, file_sha256, validate_version
from service.bundle.writer import BundleWriter
from service.registry.archive import UploadError, unpack
from service.registry.store import ModelStore, StoreError, UnknownVersion
from service.registry.errors import RefusalReason, ValidationFailed
from service.registry.validation import BaseModelSpec, ValidationReport, validate

if TYPE_CHECKING:
    from service.engine.base import ScoringEngine
    from service.model import ModelHolder
    from service.personalization.adapter_cache import AdapterCache

log = logging.getLogger(__name__)

STAGING_PREFIXES = (".upload-", ".incoming-", ".staging-", ".deleted-", ".replaced-")
STALE_AFTER_S = 3600.0
WARM_VERSIONS = 2  # loaded versions kept besides the active one (pushed, previously active)
# Parts that may be pushed on top of a base version, by what they replace.
PART_GROUPS = {
    "lora": {"lora/config.json", "lora/weights.safetensors"},
    "crm": {"crm/config.json", "crm/weights.safetensors"},
}
OPTIONAL_PARTS = {"fusion.json"}


@dataclass(frozen=True)
class ActivationResult:
    version: str
    previous: str
    validation: ValidationReport | None
    seconds: float


@dataclass
class RegistryEvents:
    """Metrics hooks."""

    activated: Callable[[str, str], None] = lambda kind, version: None  # kind: activate | rollback | follow
    refused: Callable[[str], None] = lambda reason: None


class ModelManager:
    """The versions of one service: ``holder`` is what its requests read, ``engine`` (None without
    an LLM) scores the smoke tests, ``cache`` holds adapters keyed by version."""

    def __init__(self, store: ModelStore, holder: "ModelHolder", engine: "ScoringEngine | None",
                 cache: "AdapterCache", spec: BaseModelSpec | None, *, max_rank: int, max_upload_bytes: int,
                 events: RegistryEvents | None = None) -> None:
        self.store, self.holder, self.engine, self.cache, self.spec = store, holder, engine, cache, spec
        self.max_rank, self.max_upload_bytes = max_rank, max_upload_bytes
        self.events = events or RegistryEvents()
        self._lock = threading.Lock()
        self._refused_pointer: str | None = None
        self._warm: OrderedDict[str, tuple] = OrderedDict()  # version -> (manifest sha256, model, builder)

    def record_start(self) -> None:
        """Put the version this gateway started on at the top of the activation history (it may
        have been chosen as the newest bundle, never activated), so a rollback has a reference."""
        history = self.store.history()
        if not history or history[-1]["version"] != self.active:
            self.store.record_activation(self.active)

    @property
    def active(self) -> str:
        return self.holder.version

    # -- queries -----------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every version in the store with its manifest summary, newest last."""
        active, out = self.active, []
        previous = self.store.previous(active)
        for version in self.store.versions():
            try:
                manifest = self.store.manifest(version)
            except (StoreError, ValueError) as exc:
                out.append({"version": version, "active": version == active, "error": str(exc)})
                continue
            out.append({
                "version": version, "active": version == active, "previous": version == previous,
                "created_at": manifest.created_at.isoformat(), "description": manifest.description,
                "components": {k: c.kind for k, c in manifest.components.items()},
                "metrics": manifest.metrics, "parents": manifest.parents,
                "size_bytes": sum(f.size for f in manifest.files),
            })
        return out

    def history(self) -> list[dict[str, str]]:
        return self.store.history()

    # -- pushes ------------------------------------------------------------------------------

    def incoming_path(self) -> Path:
        """Where an upload's body is spooled (inside the store: same disk, same rename domain)."""
        self.store.root.mkdir(parents=True, exist_ok=True)
        return self.store.root / f".incoming-{uuid.uuid4().hex}.tar"

    def push_bundle(self, archive: Path, version: str, *, activate: bool = False) -> dict[str, Any]:
        """A whole bundle from a tar; validated in staging, then published (and maybe activated)."""
        with self._refusals(), self._lock:
            self._check_new_version(version)
            staging = self._staging()
            try:
                target = staging / version
                target.mkdir()
                unpack(archive, target, max_bytes=self.max_upload_bytes)
                return self._publish_validated(staging, version, activate)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def push_parts(self, archive: Path, version: str, *, base: str | None = None,
                   activate: bool = False, description: str = "") -> dict[str, Any]:
        """A new LoRA set or CRM checkpoint on top of ``base`` (default: the active version)."""
        with self._refusals(), self._lock:
            self._check_new_version(version)
            base = base or self.active
            if not self.store.exists(base):
                raise UnknownVersion(f"base version {base!r} is not in the store")
            staging = self._staging()
            try:
                parts = staging / "parts"
                parts.mkdir()
                names = set(unpack(archive, parts, max_bytes=self.max_upload_bytes, allow_manifest=False))
                replaced = self._check_parts(names)
                self._derive(staging, base, version, parts, names, replaced, description)
                return self._publish_validated(staging, version, activate)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def register(self, version: str) -> dict[str, Any]:
        """Validate a version copied into the store by other means (no activation)."""
        with self._refusals(), self._lock:
            if not self.store.exists(version):
                raise UnknownVersion(f"version {version!r} is not in the store")
            _, _, report = self._validate(self.store.path(version))
            return {"version": version, "checks": report.checks, "activated": False}

    # -- activation --------------------------------------------------------------------------

    def activate(self, version: str) -> ActivationResult:
        with self._refusals(), self._lock:
            return self._activate(version, kind="activate")

    def rollback(self) -> ActivationResult:
        with self._refusals(), self._lock:
            previous = self.store.previous(self.active)
            if previous is None:
                raise StoreError("there is no previous version to roll back to")
            return self._activate(previous, kind="rollback")

    def follow_pointer(self) -> ActivationResult | None:
        """Serve what the store's ACTIVE pointer names when another gateway sharing the store
        activated it; a version refused here is not retried until the pointer moves again."""
        target = self.store.pointer()
        if not target or target == self.active or target == self._refused_pointer or not self.store.exists(target):
            return None
        start = time.perf_counter()
        with self._lock:
            target = self.store.pointer()  # again under the lock: an activation here may have just moved it
            if not target or target == self.active or not self.store.exists(target):
                return None
            previous = self.active
            try:
                report = self._swap_in(target)
            except (ValidationFailed, UploadError) as exc:
                self._refused_pointer = target
                self.events.refused(exc.reason)
                log.error("the store's ACTIVE pointer names %s, which fails validation here: %s", target, exc)
                return None
            self.events.activated("follow", target)
        log.info("model follow: %s -> %s (the store's ACTIVE pointer)", previous, target)
        return ActivationResult(target, previous, report, time.perf_counter() - start)

    def delete(self, version: str) -> None:
        with self._lock:
            validate_version(version)
            self.store.delete(version, active=self.active)
            self._warm.pop(version, None)
            self.cache.drop_version(version)

    # -- internals ---------------------------------------------------------------------------

    def _activate(self, version: str, *, kind: str) -> ActivationResult:
        start = time.perf_counter()
        previous = self.active
        if not self.store.exists(version):
            raise UnknownVersion(f"version {version!r} is not in the store")
        report = self._swap_in(version) if version != previous else None
        self.store.record_activation(version, rollback=kind == "rollback")
        self.events.activated(kind, version)
        seconds = time.perf_counter() - start
        log.info("model %s: %s -> %s in %.2f s", kind, previous, version, seconds)
        return ActivationResult(version, previous, report, seconds)

    def _swap_in(self, version: str) -> ValidationReport:
        """Serve ``version``: its objects validated earlier in this process when still held and
        unchanged, else freshly validated; the version it replaces is held for a rollback."""
        warm = self._take_warm(version)
        if warm is not None:
            model, builder = warm
            report = ValidationReport(version, ["validated earlier in this process; manifest unchanged"])
        else:
            model, builder, report = self._validate(self.store.path(version))
        old = self.holder.swap(model, builder)
        self._keep_warm(old.version, old.model, old.builder)
        return report

    def _validate(self, bundle_dir: Path):
        current_builder = self.holder.snapshot().builder
        tokenizer = current_builder.tokenizer if current_builder is not None else None

        def builder_for(prompt_config):
            from service.llm.prompt import PromptBuilder

            return PromptBuilder(tokenizer, prompt_config)

        return validate(bundle_dir, self.spec if tokenizer is not None else None, max_rank=self.max_rank,
                        engine=self.engine if tokenizer is not None else None, builder_for=builder_for)

    def _publish_validated(self, staging: Path, version: str, activate: bool) -> dict[str, Any]:
        model, builder, report = self._validate(staging / version)
        self._check_new_version(version)
        os.rename(staging / version, self.store.path(version))
        model.bundle = dataclasses.replace(model.bundle, root=self.store.path(version))
        self._keep_warm(version, model, builder)
        log.info("model %s published to the store", version)
        result: dict[str, Any] = {"version": version, "checks": report.checks, "activated": False}
        if activate:
            activation = self._activate(version, kind="activate")
            result.update(activated=True, previous=activation.previous)
        return result

    def _keep_warm(self, version: str, model, builder) -> None:
        """Keep a validated version's loaded objects (the one just pushed, the one just replaced),
        so activating or rolling back to it is a swap instead of a reload and smoke test. Keyed
        by the manifest's bytes: a directory changed on disk since is validated again."""
        try:
            digest = file_sha256(self.store.path(version) / MANIFEST_NAME)
        except OSError:
            return
        self._warm[version] = (digest, model, builder)
        self._warm.move_to_end(version)
        while len(self._warm) > WARM_VERSIONS:
            self._warm.popitem(last=False)

    def _take_warm(self, version: str):
        """(model, builder) held for ``version`` if its manifest is unchanged, else None."""
        entry = self._warm.pop(version, None)
        if entry is None:
            return None
        digest, model, builder = entry
        try:
            if file_sha256(self.store.path(version) / MANIFEST_NAME) != digest:
                return None
        except OSError:
            return None
        return model, builder

    def _check_new_version(self, version: str) -> None:
        try:
            validate_version(version)
        except ValueError as exc:
            raise ValidationFailed(RefusalReason.NAME, str(exc)) from None
        if self.store.exists(version) or os.path.lexists(self.store.root / version):
            raise ValidationFailed(RefusalReason.EXISTS, f"version {version!r} already exists; versions are immutable, "
                                   "push under a new name")

    def _staging(self) -> Path:
        path = self.store.root / f".upload-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    @staticmethod
    def _check_parts(names: set[str]) -> list[str]:
        allowed = set().union(*PART_GROUPS.values()) | OPTIONAL_PARTS
        unknown = sorted(names - allowed)
        if unknown:
            raise UploadError(f"parts may only be {sorted(allowed)}; got {unknown[:5]}")
        groups = [g for g, files in PART_GROUPS.items() if names & files]
        if not groups:
            raise UploadError(f"the parts archive replaces nothing: include {sorted(PART_GROUPS['lora'])} "
                              f"or {sorted(PART_GROUPS['crm'])}")
        return groups

    def _derive(self, staging: Path, base: str, version: str, parts: Path, names: set[str], groups: list[str],
                description: str) -> None:
        """Write ``version`` = ``base`` with the pushed files replacing its own (hashes recomputed)."""
        base_dir = self.store.path(base)
        manifest = self.store.manifest(base)
        try:
            with BundleWriter(staging, version, description=description or
                              f"{base} with a new {' and '.join(groups)} ({', '.join(sorted(names))})") as writer:
                for entry in manifest.files:
                    if entry.path not in names:
                        writer.add_file(entry.path, base_dir / entry.path)
                for name in sorted(names):
                    writer.add_file(name, parts / name)
                for name, component in manifest.components.items():
                    writer.set_component(name, kind=component.kind, config=component.config)
                writer.set_parents([base])
                # Offline metrics described the base's weights; they do not carry over.
                writer.set_extra({"derived_from": base, "replaced": sorted(names)})
        except BundleError as exc:
            raise ValidationFailed(RefusalReason.BUNDLE, str(exc)) from None

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """Count a refused push or activation by reason as it propagates."""
        try:
            yield
        except (ValidationFailed, UploadError) as exc:
            self.events.refused(exc.reason)
            raise

    def clean_stale(self) -> None:
        """Remove leftovers of interrupted uploads and deletions (older than an hour)."""
        if not self.store.root.is_dir():
            return
        now = time.time()
        for path in self.store.root.iterdir():
            if path.name.startswith(STAGING_PREFIXES) and now - path.lstat().st_mtime > STALE_AFTER_S:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
