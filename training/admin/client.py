"""A small client of the gateway's admin API (/admin/v1), used by ``reclora push`` and friends.

Bundles travel as tar archives of their directory; parts (a new LoRA set or CRM checkpoint) as a
tar of the files they replace, named as inside a bundle (``lora/weights.safetensors``, ...).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service.registry.archive import pack

CHUNK = 1 << 20
# Files of a `reclora train-llm` directory and of a CRM checkpoint, by their path inside a bundle.
LORA_PARTS = {"config.json": "lora/config.json", "weights.safetensors": "lora/weights.safetensors"}
CRM_PARTS = {"config.json": "crm/config.json", "weights.safetensors": "crm/weights.safetensors"}


class AdminError(RuntimeError):
    """The service refused or failed a request; the message is the service's own."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code


def parts_dir(lora: Path | None, crm: Path | None, fusion: Path | None, dest: Path) -> Path:
    """Lay out pushed parts as they sit inside a bundle, ready to pack."""
    if lora is None and crm is None:
        raise ValueError("push parts: give --lora and/or --crm")
    for source, mapping in ((lora, LORA_PARTS), (crm, CRM_PARTS)):
        if source is None:
            continue
        for name, rel in mapping.items():
            if not (source / name).is_file():
                raise FileNotFoundError(f"{source / name} is missing")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((source / name).read_bytes())
    if fusion is not None:
        (dest / "fusion.json").write_bytes(fusion.read_bytes())
    return dest


class AdminClient:
    def __init__(self, url: str, token: str, *, timeout: float = 600.0) -> None:
        if not token:
            raise ValueError("an admin token is needed: pass --token or set RECLORA_ADMIN_TOKEN")
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminError(0, "unreachable", f"{self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", response.text[:500]
            raise AdminError(response.status_code, code, message)
        return response.json() if response.content else {}

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/admin/v1/models")

    def activate(self, version: str) -> dict[str, Any]:
        return self._call("POST", f"/admin/v1/models/{version}/activate")

    def validate(self, version: str) -> dict[str, Any]:
        return self._call("POST", f"/admin/v1/models/{version}/validate")

    def rollback(self) -> dict[str, Any]:
        return self._call("POST", "/admin/v1/rollback")

    def delete(self, version: str) -> None:
        self._call("DELETE", f"/admin/v1/models/{version}")

    def canary(self, version: str, percent: float, *, shadow: bool = False) -> dict[str, Any]:
        return self._call("POST", "/admin/v1/canary", json={"version": version, "percent": percent, "shadow": shadow})

    def canary_status(self) -> dict[str, Any]:
        return self._call("GET", "/admin/v1/canary")

    def promote(self) -> dict[str, Any]:
        return self._call("POST", "/admin/v1/canary/promote")

    def abort(self, reason: str = "") -> dict[str, Any]:
        return self._call("POST", "/admin/v1/canary/abort", json={"reason": reason})

    def online(self, *, window_s: float | None = None, bucket_s: float = 60.0) -> dict[str, Any]:
        params: dict[str, Any] = {"bucket_s": bucket_s}
        if window_s is not None:
            params["window_s"] = window_s
        return self._call("GET", "/admin/v1/online", params=params)

    def push(self, source: Path, version: str, *, parts: bool = False, activate: bool = False,
             base: str | None = None, description: str = "",
             progress: Callable[[int, int], None] = lambda sent, total: None) -> dict[str, Any]:
        """Pack ``source`` (a bundle directory, or a parts layout) and upload it."""
        with tempfile.TemporaryDirectory() as tmp:
            archive = pack(source, Path(tmp) / "upload.tar")
            total = archive.stat().st_size
            params: dict[str, Any] = {"activate": str(activate).lower()}
            if parts:
                params.update({k: v for k, v in (("base", base), ("description", description)) if v})
            path = f"/admin/v1/models/{version}" + ("/parts" if parts else "")
            return self._call("PUT", path, params=params, content=_chunks(archive, total, progress),
                              headers={"Content-Type": "application/x-tar", "Content-Length": str(total)})


def _chunks(path: Path, total: int, progress: Callable[[int, int], None]) -> Iterator[bytes]:
    sent = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sent += len(chunk)
            progress(sent, total)
            yield chunk
