"""Wire schema of the admin API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class VersionInfo(BaseModel):
    version: str
    active: bool
    previous: bool = Field(False, description="The version a rollback would return to.")
    created_at: str | None = None
    description: str = ""
    components: dict[str, str] = Field(default_factory=dict, description="Component name -> kind.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Offline metrics recorded at export.")
    parents: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    error: str | None = Field(None, description="Why the manifest could not be read, if it could not.")


class VersionList(BaseModel):
    active: str
    versions: list[VersionInfo]
    history: list[dict[str, str]] = Field(description="Activations, oldest first.")


class PushResult(BaseModel):
    version: str
    checks: list[str] = Field(description="The validation checks passed.")
    activated: bool
    previous: str | None = Field(None, description="The version served before, when activated.")
    seconds: float


class ActivationResponse(BaseModel):
    version: str
    previous: str
    seconds: float = Field(description="Validation and swap time.")
    checks: list[str] = Field(default_factory=list)
