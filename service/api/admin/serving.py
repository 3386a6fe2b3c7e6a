"""Admin logic between HTTP and the model registry: spooling uploads, mapping refusals to errors.

Registry operations load and score models, so they run in a worker thread; the event loop keeps
serving traffic meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import HTTPException
from redis.exceptions import RedisError

from service.api.admin.protocol import (ActivationResponse, CanaryInfo, CanaryRequest, CanaryStatus, OnlineMetrics,
                                        OnlinePoint, OnlineReport, PushResult, SideStats, VersionInfo, VersionList)
from service.api.errors import ApiError, Conflict, ErrorDetail, InvalidRequest, Unavailable
from service.registry.archive import UploadError, receive
from service.registry.errors import RefusalReason, ValidationFailed
from service.registry.store import CanaryState, StoreError, UnknownVersion
from service.scoring.contracts import OnlineEvaluation, VersionMetrics

if TYPE_CHECKING:  # the registry loads models (torch); the app imports without it
    from service.registry.manager import ActivationResult, ModelManager

T = TypeVar("T")


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class TooLarge(ApiError):
    status_code = 413
    code = "content_too_large"


def _refusal(exc: Exception) -> ApiError:
    if isinstance(exc, ValidationFailed):
        if exc.reason == RefusalReason.EXISTS:
            return Conflict(str(exc), code="version_exists")
        return InvalidRequest([ErrorDetail(loc="bundle", message=str(exc), type=exc.reason)],
                              code="model_refused", message=f"model refused ({exc.reason}): {exc}")
    if isinstance(exc, UploadError):
        if exc.reason == RefusalReason.TOO_LARGE:
            return TooLarge(str(exc))
        return InvalidRequest([ErrorDetail(loc="body", message=str(exc), type=exc.reason)],
                              code="model_refused", message=f"model refused ({exc.reason}): {exc}")
    if isinstance(exc, UnknownVersion):
        return NotFound(str(exc), code="unknown_version")
    return Conflict(str(exc))


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (ValidationFailed, UploadError, StoreError) as exc:
        raise _refusal(exc) from None


def _canary(state: CanaryState | None) -> CanaryInfo | None:
    return CanaryInfo(**state.model_dump()) if state is not None else None


def list_versions(manager: ModelManager) -> VersionList:
    return VersionList(active=manager.active, versions=[VersionInfo(**v) for v in manager.describe()],
                       history=manager.history(), canary=_canary(manager.canary_state()))


async def push(manager: ModelManager, body: AsyncIterator[bytes], version: str, *, parts: bool,
               activate: bool, base: str | None = None, description: str = "") -> PushResult:
    """Spool the body into the store, then validate and publish it (and activate when asked)."""
    start = time.perf_counter()
    path = manager.incoming_path()
    try:
        try:
            await receive(body, path, manager.admin_settings.admin_max_upload_bytes)
        except UploadError as exc:
            manager.telemetry.count(exc.reason)
            raise _refusal(exc) from None
        except HTTPException as exc:  # the body limit middleware cut the stream
            if exc.status_code == 413:
                manager.telemetry.count(RefusalReason.TOO_LARGE)
            raise
        if parts:
            result = await _run(manager.push_parts, path, version, base=base, activate=activate,
                                description=description)
        else:
            result = await _run(manager.push_bundle, path, version, activate=activate)
    finally:
        path.unlink(missing_ok=True)
    return PushResult(**result, seconds=time.perf_counter() - start)


async def validate(manager: ModelManager, version: str) -> PushResult:
    start = time.perf_counter()
    result = await _run(manager.register, version)
    return PushResult(**result, seconds=time.perf_counter() - start)


def _activation(result: ActivationResult) -> ActivationResponse:
    return ActivationResponse(version=result.version, previous=result.previous, seconds=result.seconds,
                              checks=result.validation.checks if result.validation else [])


async def activate(manager: ModelManager, version: str) -> ActivationResponse:
    return _activation(await _run(manager.activate, version))


async def rollback(manager: ModelManager) -> ActivationResponse:
    return _activation(await _run(manager.rollback))


async def delete(manager: ModelManager, version: str) -> None:
    await _run(manager.delete, version)


def canary_status(manager: ModelManager) -> CanaryStatus:
    state = manager.canary_state()
    sides = manager.canary_stats() if state is not None and state.running else {}
    return CanaryStatus(canary=_canary(state), sides={v: SideStats(**stats) for v, stats in sides.items()})


async def start_canary(manager: ModelManager, request: CanaryRequest) -> CanaryStatus:
    await _run(manager.start_canary, request.version, request.percent, shadow=request.shadow)
    return canary_status(manager)


async def promote(manager: ModelManager) -> ActivationResponse:
    return _activation(await _run(manager.promote))


async def abort(manager: ModelManager, reason: str) -> CanaryStatus:
    await _run(manager.abort, reason)
    return canary_status(manager)


def _metrics(m: VersionMetrics) -> dict:
    return {"version": m.version, "labels": m.labels, "positives": m.positives, "auc": m.auc, "logloss": m.logloss,
            "mean_predicted": m.mean_predicted, "positive_rate": m.positive_rate}


async def online_report(online: OnlineEvaluation, window_s: float | None, bucket_s: float) -> OnlineReport:
    try:
        report = await online.report(window_s, bucket_s)
    except (RedisError, OSError) as exc:
        raise Unavailable(f"the labels in Redis could not be read: {exc}", code="online_unavailable") from None
    return OnlineReport(window_s=report.window_s, bucket_s=report.bucket_s,
                        versions=[OnlineMetrics(**_metrics(m)) for m in report.versions],
                        series=[OnlinePoint(start=start, **_metrics(m)) for start, m in report.series])
