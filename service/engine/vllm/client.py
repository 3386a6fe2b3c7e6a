"""HTTP transport to one vLLM OpenAI-compatible server: pooled connections, per-call timeouts,
and errors sorted by what the caller may do about them.

- ``ReplicaUnavailable``: the server cannot be reached or failed as a whole (connect error,
  dropped connection, 5xx). Scoring reads nothing and writes nothing on the server, so the engine
  may safely resend it to another replica.
- ``AdapterNotLoaded``: the server does not know the adapter name (it restarted, or another
  gateway unloaded it); load it again and resend.
- ``VLLMRequestError``: the server rejected the request itself (4xx); resending cannot help.
- ``TimeoutError``: no answer before the request's deadline; resending would overrun it too.
"""

from __future__ import annotations

import time

import httpx
from pydantic import BaseModel, ValidationError

from service.engine.vllm.protocol import (CompletionRequest, CompletionResponse, GenerativeScoringRequest,
                                          GenerativeScoringResponse, LoadAdapterRequest, ModelList,
                                          UnloadAdapterRequest)


class VLLMError(RuntimeError):
    """Base of the errors of one vLLM server."""


class ReplicaUnavailable(VLLMError):
    """The server is unreachable or failed as a whole: mark it down and try another."""


class AdapterNotLoaded(VLLMError):
    """The server does not hold the named adapter."""


class VLLMRequestError(VLLMError):
    """The server refused the request (4xx other than an unknown adapter)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class VLLMTimeout(TimeoutError, VLLMError):
    """No answer before the deadline."""


class VLLMClient:
    """One server. Thread-safe (httpx.Client is); every call takes its own time budget."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 1.0, max_connections: int = 32,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self._http = httpx.Client(
            base_url=self.base_url, transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(30.0, connect=connect_timeout_s))

    def close(self) -> None:
        self._http.close()

    # --- scoring

    def generative_scoring(self, request: GenerativeScoringRequest, timeout_s: float) -> list[float]:
        body = self._post("/generative_scoring", request, timeout_s)
        return _parse(GenerativeScoringResponse, body).scores(len(request.items))

    def completions(self, request: CompletionRequest, timeout_s: float) -> list[float]:
        body = self._post("/v1/completions", request, timeout_s)
        return _parse(CompletionResponse, body).label_probability(len(request.prompt), request.allowed_token_ids)

    # --- adapters

    def load_adapter(self, name: str, path: str, timeout_s: float) -> None:
        """Register (or re-register in place) an adapter directory the server can read at ``path``."""
        try:
            self._post("/v1/load_lora_adapter", LoadAdapterRequest(lora_name=name, lora_path=path), timeout_s)
        except AdapterNotLoaded as exc:  # vLLM answers 404 when the directory is not there
            raise VLLMRequestError(404, f"the server cannot read adapter {name} at {path}: is the adapter "
                                        f"directory shared with it? ({exc})") from exc

    def unload_adapter(self, name: str, timeout_s: float) -> None:
        """Unregister an adapter; one the server does not hold counts as unloaded."""
        try:
            self._post("/v1/unload_lora_adapter", UnloadAdapterRequest(lora_name=name), timeout_s)
        except AdapterNotLoaded:
            pass

    # --- discovery

    def models(self, timeout_s: float) -> ModelList:
        return _parse(ModelList, self._request("GET", "/v1/models", None, timeout_s).json())

    def healthy(self, timeout_s: float) -> bool:
        try:
            return self._http.get("/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def has_generative_scoring(self, timeout_s: float) -> bool:
        """Whether the server has the route: an empty body gets 400 (validation) where it exists
        and FastAPI's plain 404 where it does not."""
        try:
            response = self._http.post("/generative_scoring", json={}, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ReplicaUnavailable(f"{self.base_url}: {exc!r}") from exc
        if response.status_code >= 500:
            raise ReplicaUnavailable(f"{self.base_url}: HTTP {response.status_code}")
        return response.status_code != 404

    # --- plumbing

    def _post(self, path: str, request: BaseModel, timeout_s: float) -> dict | str:
        response = self._request("POST", path, request.model_dump(), timeout_s)
        try:
            return response.json()
        except ValueError:
            return response.text

    def _request(self, method: str, path: str, body: dict | None, timeout_s: float) -> httpx.Response:
        if timeout_s <= 0:
            raise VLLMTimeout(f"{self.base_url}{path}: no time left before the deadline")
        timeout = httpx.Timeout(timeout_s, connect=min(self.connect_timeout_s, timeout_s))
        started = time.perf_counter()
        try:
            response = self._http.request(method, path, json=body, timeout=timeout)
        except httpx.ConnectTimeout as exc:  # nothing was sent: the host does not answer at all
            raise ReplicaUnavailable(f"{self.base_url}: connect timeout") from exc
        except httpx.TimeoutException as exc:  # sent, no answer in time: the server may just be busy
            raise VLLMTimeout(f"{self.base_url}{path}: no answer within "
                              f"{time.perf_counter() - started:.3f} s") from exc
        except httpx.TransportError as exc:  # refused, reset, closed mid-answer
            raise ReplicaUnavailable(f"{self.base_url}: {exc!r}") from exc
        if response.status_code >= 500:
            raise ReplicaUnavailable(f"{self.base_url}{path}: HTTP {response.status_code}: {_message(response)}")
        if response.status_code == 404:
            raise AdapterNotLoaded(f"{self.base_url}{path}: {_message(response)}")
        if response.status_code >= 400:
            raise VLLMRequestError(response.status_code, f"{self.base_url}{path}: {_message(response)}")
        return response


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))[:300]
    return str(body)[:300]


def _parse(model: type[BaseModel], body):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise VLLMError(f"unexpected answer from the server: {exc}") from exc
