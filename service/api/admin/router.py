"""HTTP transport of the admin API (/admin/v1); every route needs an admin bearer token.

Uploads are tar archives in the request body (``Content-Type: application/x-tar``, gzip
allowed), streamed to disk under the upload cap; ``reclora push`` builds and sends them.
``/canary`` starts, changes, promotes and aborts a canary; ``/online`` reports the online metrics
per version (``reclora canary / promote / abort / online-report``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response

from service.api.admin import serving
from service.api.admin.auth import require_admin
from service.api.admin.protocol import (VERSION_PATTERN, AbortRequest, ActivationResponse, CanaryRequest,
                                        CanaryStatus, OnlineReport, PushResult, VersionList)
from service.api.deps import OnlineDep
from service.api.errors import ERROR_RESPONSES, ErrorResponse, Unavailable

if TYPE_CHECKING:  # the registry loads models (torch); the app imports without it
    from service.registry.manager import ModelManager

VersionPath = Annotated[str, Path(pattern=VERSION_PATTERN, description="Bundle version (a directory name).")]


def _manager(request: Request) -> "ModelManager":
    manager = request.app.state.models
    if manager is None:
        raise Unavailable("model management is not available until the model is loaded",
                          code="model_not_ready", retry_after_s=5)
    return manager


if TYPE_CHECKING:
    ManagerDep = Annotated[ModelManager, Depends(_manager)]
else:
    ManagerDep = Annotated[Any, Depends(_manager)]
RESPONSES = {**ERROR_RESPONSES, **{s: {"model": ErrorResponse} for s in (401, 404, 409, 413)}}
_TAR_BODY = {"requestBody": {"required": True, "content": {"application/x-tar": {"schema": {
    "type": "string", "format": "binary"}}}}}

router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)], responses=RESPONSES)


@router.get("/models", response_model=VersionList)
async def list_models(manager: ManagerDep) -> VersionList:
    """Every version in the store with its manifest summary and offline metrics; the activation history."""
    return serving.list_versions(manager)


@router.put("/models/{version}", response_model=PushResult, status_code=201, openapi_extra=_TAR_BODY)
async def push_bundle(version: VersionPath, request: Request, manager: ManagerDep,
                      activate: Annotated[bool, Query(description="Activate once validated.")] = False) -> PushResult:
    """Upload a whole bundle (tar of its directory); validated before it is stored."""
    return await serving.push(manager, request.stream(), version, parts=False, activate=activate)


@router.put("/models/{version}/parts", response_model=PushResult, status_code=201, openapi_extra=_TAR_BODY)
async def push_parts(
    version: VersionPath, request: Request, manager: ManagerDep,
    base: Annotated[str | None, Query(pattern=VERSION_PATTERN, description="Default: the active version.")] = None,
    activate: Annotated[bool, Query(description="Activate once validated.")] = False,
    description: Annotated[str, Query(max_length=500)] = "",
) -> PushResult:
    """A new personalized-LoRA set (lora/config.json, lora/weights.safetensors) or CRM checkpoint
    (crm/weights.safetensors, crm/config.json), optionally fusion.json, on top of a base version."""
    return await serving.push(manager, request.stream(), version, parts=True, activate=activate, base=base,
                              description=description)


@router.post("/models/{version}/validate", response_model=PushResult)
async def validate_model(version: VersionPath, manager: ManagerDep) -> PushResult:
    """Run every activation check on a version already in the store, without activating it."""
    return await serving.validate(manager, version)


@router.post("/models/{version}/activate", response_model=ActivationResponse)
async def activate_model(version: VersionPath, manager: ManagerDep) -> ActivationResponse:
    """Validate and serve this version; requests in flight finish on the version they started with."""
    return await serving.activate(manager, version)


@router.post("/rollback", response_model=ActivationResponse)
async def rollback(manager: ManagerDep) -> ActivationResponse:
    """Serve the previously active version again."""
    return await serving.rollback(manager)


@router.delete("/models/{version}", status_code=204)
async def delete_model(version: VersionPath, manager: ManagerDep) -> Response:
    """Delete an inactive version from the store."""
    await serving.delete(manager, version)
    return Response(status_code=204)


@router.get("/canary", response_model=CanaryStatus)
async def canary_status(manager: ManagerDep) -> CanaryStatus:
    """The last canary (running, promoted or aborted, and why) and this gateway's counts per side."""
    return serving.canary_status(manager)


@router.post("/canary", response_model=CanaryStatus)
async def start_canary(body: CanaryRequest, manager: ManagerDep) -> CanaryStatus:
    """Route a share of users (by a stable hash of their id) to a candidate version, or shadow
    their requests with it; the same candidate again changes its share or mode."""
    return await serving.start_canary(manager, body)


@router.post("/canary/promote", response_model=ActivationResponse)
async def promote_canary(manager: ManagerDep) -> ActivationResponse:
    """Serve the running canary's candidate to every user."""
    return await serving.promote(manager)


@router.post("/canary/abort", response_model=CanaryStatus)
async def abort_canary(manager: ManagerDep, body: Annotated[AbortRequest | None, Body()] = None) -> CanaryStatus:
    """Return every user to the stable version."""
    return await serving.abort(manager, body.reason if body is not None else "")


@router.get("/online", response_model=OnlineReport)
async def online_report(
    online: OnlineDep,
    window_s: Annotated[float | None, Query(gt=0, le=30 * 86_400, description="Default: the configured window.")]
        = None,
    bucket_s: Annotated[float, Query(gt=0, le=86_400, description="Width of the time series' buckets.")] = 60.0,
) -> OnlineReport:
    """AUC, LogLoss and calibration of the labelled served scores per version, over the window and
    per time bucket."""
    if online is None:
        raise Unavailable("online evaluation is not available: the model is not loaded yet, or the served-score "
                          "log is off (RECLORA_SERVED_LOG)", code="online_unavailable", retry_after_s=5)
    return await serving.online_report(online, window_s, bucket_s)
