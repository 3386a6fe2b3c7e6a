"""Wire schema of the admin API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class VersionInfo(BaseModel):
    version: str
    active: bool
    previous: bool = Field(False, description="The version a rollback would return to.")
    canary: bool = Field(False, description="The running canary's candidate.")
    created_at: str | None = None
    description: str = ""
    components: dict[str, str] = Field(default_factory=dict, description="Component name -> kind.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Offline metrics recorded at export.")
    parents: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    error: str | None = Field(None, description="Why the manifest could not be read, if it could not.")


class CanaryInfo(BaseModel):
    """A canary as the store records it."""

    candidate: str
    stable: str = Field(description="The version active when it started.")
    percent: float = Field(description="Share of users assigned to the candidate by a hash of their id.")
    shadow: bool = Field(description="The candidate scores its users' requests in the background; never served.")
    status: Literal["running", "promoted", "aborted"]
    started_at: str
    ended_at: str | None = None
    ended_by: Literal["operator", "guard"] | None = None
    reason: str | None = Field(None, description="Why it was aborted.")
    rail: str | None = Field(None, description="The guard rail that aborted it (errors, degraded, latency_p99, "
                                               "online_auc).")


class VersionList(BaseModel):
    active: str
    versions: list[VersionInfo]
    history: list[dict[str, str]] = Field(description="Activations, oldest first.")
    canary: CanaryInfo | None = Field(None, description="The last canary: running, promoted or aborted.")


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN, description="The candidate, a version in the store.")
    percent: float = Field(gt=0, le=100, description="Share of users (0-100] assigned to the candidate.")
    shadow: bool = Field(False, description="Score the assigned users' requests with the candidate in the "
                                            "background and record the scores; serve the stable version.")


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500, description="Recorded with the abort.")


class SideStats(BaseModel):
    requests: int
    error_share: float
    degraded_share: float
    p99_ms: float | None


class CanaryStatus(BaseModel):
    canary: CanaryInfo | None = Field(description="The last canary; null when there never was one.")
    sides: dict[str, SideStats] = Field(default_factory=dict, description=(
        "This gateway's counts per version of the running canary, as its guard rails see them."))


class OnlineMetrics(BaseModel):
    version: str
    labels: int = Field(description="Labelled served scores.")
    positives: int
    auc: float | None = Field(description="Null until both labels occur.")
    logloss: float | None
    mean_predicted: float | None = Field(description="Calibration: the mean served score ...")
    positive_rate: float | None = Field(description="... against the observed positive rate.")


class OnlinePoint(OnlineMetrics):
    start: float = Field(description="Start of the time bucket, Unix seconds.")


class OnlineReport(BaseModel):
    window_s: float
    bucket_s: float
    versions: list[OnlineMetrics] = Field(description="Over the whole window, per version.")
    series: list[OnlinePoint] = Field(description="Per time bucket and version, oldest first.")


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
