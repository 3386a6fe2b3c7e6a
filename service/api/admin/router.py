"""HTTP transport of the admin API (/admin/v1); every route needs an admin bearer token.

Uploads are tar archives in the request body (``Content-Type: application/x-tar``, gzip
allowed), streamed to disk under the upload cap; ``reclora push`` builds and sends them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from service.api.admin import serving
from service.api.admin.auth import require_admin
from service.api.admin.protocol import ActivationResponse, PushResult, VersionList
from service.api.errors import ERROR_RESPONSES, ErrorResponse, Unavailable

if TYPE_CHECKING:  # the registry loads models (torch); the app imports without it
    from service.registry.manager import ModelManager

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
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
