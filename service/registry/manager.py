"""Push, validate, activate, roll back and delete model versions on a running service; run a
canary of a candidate version, promote or abort it.

One operation at a time (a lock): validation scores golden requests on the shared engine and
activation swaps the pipeline's model reference, so two pushes must not interleave. Scoring
traffic never waits for the lock: a request takes one snapshot of the active version when it
starts and finishes on it, so an activation neither drops nor mixes requests. New versions are
unpacked and validated in a private staging directory of the store and renamed into place only
when every check passed; a refused version never touches what is served.

A canary loads the candidate beside the stable version (the engine and base LLM are shared)
and routes a share of users to it (``ModelHolder``); its state lives in the store beside
``ACTIVE``, so every gateway sharing the store follows it and a restart resumes it. The guard
rails (``service.registry.guard``) abort it without waiting for a person: the candidate is
withdrawn from this gateway's routing at once, then the abort is recorded in the store. While a
canary runs, activation and rollback are refused: promote or abort it first.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.bundle import MANIFEST_NAME, BundleError, file_sha256, validate_version
from service.bundle.writer import BundleWriter
from service.config import AdminSettings, ModelSettings
from service.registry.archive import UploadError, unpack
from service.registry.store import CanaryState, ModelStore, StoreError, UnknownVersion, utc_now
from service.registry.errors import ActivationKind, RefusalReason, ValidationFailed
from service.registry.guard import CanaryGuard, GuardRail, Trip
from service.registry.validation import BaseModelSpec, ValidationReport, validate
from service.scoring.contracts import ServedOutcome, VersionMetrics
from service.scoring.stages import prototype_adapters
from service.telemetry import NO_TELEMETRY, Quantity, Telemetry

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


class ModelManager:
    """The versions of one service: ``holder`` is what its requests read, ``engine`` (None without
    an LLM) scores the smoke tests, ``cache`` holds adapters keyed by version."""

    def __init__(self, model: ModelSettings, admin: AdminSettings, holder: "ModelHolder",
                 engine: "ScoringEngine | None", cache: "AdapterCache | None", spec: BaseModelSpec | None, *,
                 telemetry: Telemetry = NO_TELEMETRY, guard: CanaryGuard | None = None) -> None:
        """``model``: the store and what a version may bring; ``admin``: how large an upload may be."""
        self.model_settings, self.admin_settings = model, admin
        self.store = ModelStore(model.model_store)
        self.holder, self.engine, self.cache, self.spec = holder, engine, cache, spec
        self.telemetry = telemetry
        self.guard = guard or CanaryGuard()
        self._lock = threading.Lock()
        self._refused_pointer: str | None = None
        # (candidate, started_at) of a canary this gateway must not route to although the store
        # may still say it runs: it failed validation here, or a rail tripped and the abort is
        # being recorded.
        self._not_followed: tuple[str, str] | None = None
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
        canary = self.holder.canary
        candidate = canary.candidate.version if canary is not None else None
        for version in self.store.versions():
            try:
                manifest = self.store.manifest(version)
            except (StoreError, ValueError) as exc:
                out.append({"version": version, "active": version == active, "error": str(exc)})
                continue
            out.append({
                "version": version, "active": version == active, "previous": version == previous,
                "canary": version == candidate,
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
                unpack(archive, target, max_bytes=self.admin_settings.admin_max_upload_bytes)
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
                names = set(unpack(archive, parts, max_bytes=self.admin_settings.admin_max_upload_bytes,
                                   allow_manifest=False))
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
            self._check_no_canary("activating another version")
            return self._activate(version, kind=ActivationKind.ACTIVATE)

    def rollback(self) -> ActivationResult:
        with self._refusals(), self._lock:
            self._check_no_canary("rolling back")
            previous = self.store.previous(self.active)
            if previous is None:
                raise StoreError("there is no previous version to roll back to")
            return self._activate(previous, kind=ActivationKind.ROLLBACK)

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
                self.telemetry.count(exc.reason)
                log.error("the store's ACTIVE pointer names %s, which fails validation here: %s", target, exc)
                return None
            self.telemetry.count(ActivationKind.FOLLOW, on=target)
        log.info("model follow: %s -> %s (the store's ACTIVE pointer)", previous, target)
        return ActivationResult(target, previous, report, time.perf_counter() - start)

    def delete(self, version: str) -> None:
        with self._lock:
            validate_version(version)
            canary = self.holder.canary
            if canary is not None and canary.candidate.version == version:
                raise StoreError(f"version {version!r} is the running canary's candidate; abort the canary first")
            self.store.delete(version, active=self.active)
            self._warm.pop(version, None)
            if self.cache is not None:
                self.cache.drop_version(version)

    # -- canary ------------------------------------------------------------------------------

    def canary_state(self) -> CanaryState | None:
        """The last canary the store records (running, promoted or aborted)."""
        return self.store.canary()

    def canary_stats(self) -> dict[str, dict[str, float | int | None]]:
        """This gateway's guard counts per side of the running canary."""
        return self.guard.stats()

    def start_canary(self, version: str, percent: float, *, shadow: bool = False) -> CanaryState:
        """Route ``percent`` % of users (by a stable hash of their id) to ``version``, or with
        ``shadow`` score their requests with it in the background; the same candidate again
        changes its share or mode."""
        if not 0 < percent <= 100:
            raise ValueError(f"percent must be in (0, 100], got {percent}")
        with self._refusals(), self._lock:
            validate_version(version)
            if not self.store.exists(version):
                raise UnknownVersion(f"version {version!r} is not in the store")
            if version == self.active:
                raise StoreError(f"version {version!r} is active already; a canary needs another version")
            running = self.store.canary()
            if running is not None and running.running and running.candidate != version:
                raise StoreError(f"a canary of {running.candidate!r} is running; promote or abort it first")
            current = self.holder.canary
            if current is not None and current.candidate.version == version:
                model, builder = current.candidate.model, current.candidate.builder
                started_at = running.started_at if running is not None and running.running else utc_now()
            else:
                model, builder = self._load(version)
                started_at = utc_now()
            state = CanaryState(candidate=version, stable=self.active, percent=percent, shadow=shadow,
                                started_at=started_at)
            self.store.write_canary(state)
            self._route(model, builder, state)
        log.info("canary: %s takes %g %% of users%s beside %s", version, percent, " (shadow)" if shadow else "",
                 self.active)
        return state

    def promote(self) -> ActivationResult:
        """Serve the running canary's candidate to everyone (no reload: it is loaded)."""
        with self._refusals(), self._lock:
            state = self._running_canary()
            result = self._activate(state.candidate, kind=ActivationKind.PROMOTE)
            self.store.write_canary(state.model_copy(update={"status": "promoted", "ended_at": utc_now(),
                                                             "ended_by": "operator"}))
        return result

    def abort(self, reason: str = "") -> CanaryState:
        """Return every user to the stable version; the candidate stays loaded for a rerun."""
        with self._lock:
            state = self._running_canary()
            ended = self._end(state, by="operator", reason=reason or "aborted by an operator", rail=None)
        self.telemetry.count(GuardRail.OPERATOR)
        log.warning("canary of %s aborted by an operator: %s", state.candidate, ended.reason)
        return ended

    def follow_canary(self) -> None:
        """Route as the store's canary state says (another gateway started, changed, promoted or
        aborted it, or this gateway restarted); a candidate refused here is not retried until the
        state changes."""
        if self._routes_as(self._wanted(self.store.canary()), self.holder.canary):
            return
        with self._lock:
            state = self.store.canary()  # again under the lock: an operation here may have just changed it
            want, current = self._wanted(state), self.holder.canary
            if self._routes_as(want, current):
                return
            if want is None:
                withdraw = state is not None and state.status == "aborted" and \
                    state.candidate == current.candidate.version
                ended = self.holder.end_canary(withdraw=withdraw)
                if ended is not None:
                    self._keep_warm(ended.version, ended.model, ended.builder)
                self.guard.end()
                self._report_canary(None)
                log.info("canary follow: %s ended (%s)", current.candidate.version,
                         state.status if state is not None else "no canary recorded")
                return
            try:
                if current is not None and current.candidate.version == want.candidate:
                    model, builder = current.candidate.model, current.candidate.builder
                else:
                    model, builder = self._load(want.candidate)
            except (ValidationFailed, UploadError) as exc:
                self._not_followed = (want.candidate, want.started_at)
                self.telemetry.count(exc.reason)
                log.error("the store's canary names %s, which fails validation here: %s", want.candidate, exc)
                return
            self._route(model, builder, want)
        log.info("canary follow: %s takes %g %% of users%s", want.candidate, want.percent,
                 " (shadow)" if want.shadow else "")

    def _wanted(self, state: CanaryState | None) -> CanaryState | None:
        """The canary this gateway should route by, given the store's state."""
        if state is None or not state.running or state.candidate == self.active:
            return None
        if self._not_followed == (state.candidate, state.started_at) or not self.store.exists(state.candidate):
            return None
        return state

    @staticmethod
    def _routes_as(want: CanaryState | None, current) -> bool:
        if want is None or current is None:
            return want is None and current is None
        return (current.candidate.version, current.percent, current.shadow) == (want.candidate, want.percent,
                                                                               want.shadow)

    def follow_store(self) -> None:
        """Follow the store's ACTIVE pointer, then its canary state."""
        self.follow_pointer()
        self.follow_canary()

    def observe_request(self, version: str, outcome: ServedOutcome, ms: float) -> None:
        """One response of ``version`` (event loop, per request): the request rails."""
        canary = self.holder.canary
        if canary is None or canary.shadow:
            return
        trip = self.guard.observe(version, outcome, ms)
        if trip is not None:
            self._trip(trip)

    def observe_online(self, metrics: dict[str, VersionMetrics]) -> None:
        """The latest online metrics per version: the online AUC rail."""
        if self.holder.canary is None:
            return
        trip = self.guard.observe_online(metrics)
        if trip is not None:
            self._trip(trip)

    def _trip(self, trip: Trip) -> None:
        """Withdraw the candidate here at once (no lock: a push may hold it for minutes), then
        record the abort in the store from a thread of its own."""
        canary = self.holder.canary
        if canary is None:
            return
        state = self.store.canary()
        if state is not None and state.running and state.candidate == canary.candidate.version:
            self._not_followed = (state.candidate, state.started_at)
        ended = self.holder.end_canary(withdraw=True)
        if ended is None:
            return
        log.error("canary of %s aborted by the %s guard rail: %s", ended.version, trip.rail, trip.reason)
        self.telemetry.count(trip.rail)
        self._report_canary(None)
        threading.Thread(target=self._record_trip, args=(ended, trip), name="canary-abort", daemon=True).start()

    def _record_trip(self, ended, trip: Trip) -> None:
        with self._lock:
            self._keep_warm(ended.version, ended.model, ended.builder)
            self.guard.end()
            state = self.store.canary()
            if state is not None and state.running and state.candidate == ended.version:
                self.store.write_canary(state.model_copy(update={
                    "status": "aborted", "ended_at": utc_now(), "ended_by": "guard", "reason": trip.reason,
                    "rail": str(trip.rail)}))

    def _running_canary(self) -> CanaryState:
        state = self.store.canary()
        if state is None or not state.running:
            raise StoreError("no canary is running")
        return state

    def _check_no_canary(self, what: str) -> None:
        state = self.store.canary()
        if state is not None and state.running:
            raise StoreError(f"a canary of {state.candidate!r} is running; promote or abort it before {what}")

    def _load(self, version: str):
        """(model, builder) of ``version``: held warm, else validated now."""
        warm = self._take_warm(version)
        if warm is not None:
            return warm
        model, builder, _ = self._validate(self.store.path(version))
        return model, builder

    def _route(self, model, builder, state: CanaryState) -> None:
        self._preload(model)
        current = self.holder.canary
        self.holder.start_canary(model, builder, state.percent, state.shadow)
        if current is None or current.candidate.version != state.candidate or current.shadow != state.shadow \
                or current.percent != state.percent:
            self.guard.begin(self.active, state.candidate)
        self._not_followed = None
        self._report_canary(state)

    def _end(self, state: CanaryState, *, by: str, reason: str, rail: str | None) -> CanaryState:
        ended = self.holder.end_canary(withdraw=True)
        if ended is not None:
            self._keep_warm(ended.version, ended.model, ended.builder)
        record = state.model_copy(update={"status": "aborted", "ended_at": utc_now(), "ended_by": by,
                                          "reason": reason, "rail": rail})
        self.store.write_canary(record)
        self.guard.end()
        self._report_canary(None)
        return record

    # -- internals ---------------------------------------------------------------------------

    def _report_canary(self, state: CanaryState | None) -> None:
        """The running canary's share and mode for the metrics (0 and off without one)."""
        self.telemetry.measure(Quantity.CANARY_PERCENT, state.percent if state is not None else 0.0)
        self.telemetry.measure(Quantity.CANARY_SHADOW, int(state is not None and state.shadow))

    def _activate(self, version: str, *, kind: ActivationKind) -> ActivationResult:
        start = time.perf_counter()
        previous = self.active
        if not self.store.exists(version):
            raise UnknownVersion(f"version {version!r} is not in the store")
        report = self._swap_in(version) if version != previous else None
        self.store.record_activation(version, rollback=kind is ActivationKind.ROLLBACK)
        self.telemetry.count(kind, on=version)
        seconds = time.perf_counter() - start
        log.info("model %s: %s -> %s in %.2f s", kind, previous, version, seconds)
        return ActivationResult(version, previous, report, seconds)

    def _swap_in(self, version: str) -> ValidationReport:
        """Serve ``version``: its objects validated earlier in this process when still held and
        unchanged (the canary's candidate among them), else freshly validated; the version it
        replaces is held for a rollback."""
        canary = self.holder.canary
        warm = self._take_warm(version)
        if warm is None and canary is not None and canary.candidate.version == version:
            warm = canary.candidate.model, canary.candidate.builder
        if warm is not None:
            model, builder = warm
            report = ValidationReport(version, ["validated earlier in this process; manifest unchanged"])
        else:
            model, builder, report = self._validate(self.store.path(version))
        self._preload(model)
        old = self.holder.swap(model, builder)
        self._keep_warm(old.version, old.model, old.builder)
        if canary is not None and self.holder.canary is None:  # the candidate promoted, here or elsewhere
            self.guard.end()
            self._report_canary(None)
        return report

    def _preload(self, model) -> None:
        """A version's prototype adapters made ready on the engine before it serves anyone (on
        vLLM: loaded on every replica)."""
        adapters = prototype_adapters(model)
        if adapters and self.engine is not None:
            self.engine.preload(adapters)

    def _validate(self, bundle_dir: Path):
        current_builder = self.holder.snapshot().builder
        tokenizer = current_builder.tokenizer if current_builder is not None else None

        def builder_for(prompt_config):
            from service.llm.prompt import PromptBuilder

            return PromptBuilder(tokenizer, prompt_config)

        return validate(bundle_dir, self.spec if tokenizer is not None else None,
                        max_rank=self.model_settings.max_lora_rank,
                        engine=self.engine if tokenizer is not None else None, builder_for=builder_for,
                        prototypes=self.model_settings.serves_prototypes,
                        max_prototypes=self.model_settings.max_prototypes)

    def _publish_validated(self, staging: Path, version: str, activate: bool) -> dict[str, Any]:
        model, builder, report = self._validate(staging / version)
        self._check_new_version(version)
        os.rename(staging / version, self.store.path(version))
        model.bundle = dataclasses.replace(model.bundle, root=self.store.path(version))
        self._keep_warm(version, model, builder)
        log.info("model %s published to the store", version)
        result: dict[str, Any] = {"version": version, "checks": report.checks, "activated": False}
        if activate:
            activation = self._activate(version, kind=ActivationKind.ACTIVATE)
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
        """Write ``version`` = ``base`` with the pushed files replacing its own (hashes recomputed).
        A new LoRA drops the base's prototype adapters, which mix the old one: the derived version
        serves exact adapters until prototypes are exported for it."""
        base_dir = self.store.path(base)
        manifest = self.store.manifest(base)
        dropped = (lambda path: path.startswith("prototypes/")) if "lora" in groups else (lambda path: False)
        try:
            with BundleWriter(staging, version, description=description or
                              f"{base} with a new {' and '.join(groups)} ({', '.join(sorted(names))})") as writer:
                for entry in manifest.files:
                    if entry.path not in names and not dropped(entry.path):
                        writer.add_file(entry.path, base_dir / entry.path)
                for name in sorted(names):
                    writer.add_file(name, parts / name)
                for name, component in manifest.components.items():
                    if not dropped(f"{name}/"):
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
            self.telemetry.count(exc.reason)
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
