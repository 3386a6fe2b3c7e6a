"""The vLLM scoring engine: the ScoringEngine interface over one or more vLLM servers.

A request goes to the replica the ``AffinityRouter`` picks for its user (the one most likely to
hold the user's adapter already), with the user's adapter loaded there on demand. One call scores
every candidate: ``POST /generative_scoring`` with the shared prefix as ``query`` and the suffixes
as ``items`` (token ids, so both engines score identical tokens; the server caches the prefix).
Servers without that route (detected when a replica is first reached) get one completion per
candidate in a single ``/v1/completions`` call instead.

Failures: a replica that cannot be reached or answers 5xx is marked down and the request goes to
the next replica (scoring changes nothing on a server, so resending is safe); a server that lost
the adapter (restarted) gets it again, once; a request past its deadline is not resent. When no
replica answers, the error reaches the pipeline, which answers with the CRM scores, degraded.
A monitor thread probes the replicas' /health and brings recovered ones back.

Prototype adapters (a version's finite set, ``service.llm.prototypes``) are preloaded on every
replica when the version is activated (``preload``) and again on a replica that comes back, so
their requests load nothing and go to the least-loaded replica instead of the user's own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from service.config import VLLMSettings
from service.engine.base import UserAdapter
from service.engine.vllm.adapters import AdapterLifecycle, split_key
from service.engine.vllm.client import (AdapterNotLoaded, ReplicaUnavailable, VLLMClient, VLLMRequestError,
                                       VLLMTimeout)
from service.engine.vllm.protocol import CompletionRequest, GenerativeScoringRequest
from service.engine.vllm.routing import AffinityRouter
from service.logging import BurstLog
from service.telemetry import NO_TELEMETRY, Quantity, Telemetry

log = logging.getLogger(__name__)
burst = BurstLog(log)  # a failing replica logs once per burst, not once per request
SCORING_APIS = ("auto", "generative_scoring", "completions")


@dataclass
class _Replica:
    url: str
    client: VLLMClient
    base_model: str | None = None  # served model name, learned when first reached
    api: str | None = None  # "generative_scoring" | "completions", learned when first reached
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.base_model is not None and self.api is not None


class VLLMEngine:
    """P(Yes) per candidate from remote vLLM servers, with per-user adapters loaded on demand."""

    mixes_in_forward = False  # takes materialized adapters (a user's own, or a prototype's)
    # No input embeddings by id (collaborative tokens): the scoring requests send token ids only
    # (docs/VLLM.md, "Collaborative tokens"), so the registry refuses a version whose prompts carry them.
    takes_embeds = False

    def __init__(self, clients: Sequence[VLLMClient], lifecycle: AdapterLifecycle, *, yes_id: int, no_id: int,
                 router=None, scoring_api: str = "auto", request_timeout_s: float = 30.0,
                 health_interval_s: float | None = 2.0, telemetry: Telemetry = NO_TELEMETRY) -> None:
        if not clients:
            raise ValueError("the vLLM engine needs at least one server")
        if scoring_api not in SCORING_APIS:
            raise ValueError(f"scoring_api must be one of {SCORING_APIS}, not {scoring_api!r}")
        self.replicas = {c.base_url: _Replica(c.base_url, c) for c in clients}
        self.lifecycle = lifecycle
        self.labels = [yes_id, no_id]
        self.router = router if router is not None else AffinityRouter(list(self.replicas))
        self.scoring_api = scoring_api
        self.request_timeout_s = request_timeout_s
        self.telemetry = telemetry
        self.last_replica: str | None = None  # where the last request was answered (tests, logs)
        self._stop = threading.Event()
        for url in self.replicas:
            self._probe_or_down(url)
        self._monitor: threading.Thread | None = None
        if health_interval_s:
            self._monitor = threading.Thread(target=self._watch, args=(health_interval_s,), daemon=True,
                                             name="vllm-health")
            self._monitor.start()

    @classmethod
    def from_settings(cls, settings: VLLMSettings, lifecycle: AdapterLifecycle, *, yes_id: int, no_id: int,
                      request_timeout_s: float, telemetry: Telemetry = NO_TELEMETRY) -> "VLLMEngine":
        """The engine over ``settings.replica_urls``, routed by affinity."""
        urls = settings.replica_urls
        clients = [VLLMClient(url, connect_timeout_s=settings.vllm_connect_timeout_s,
                              max_connections=settings.vllm_max_connections) for url in urls]
        return cls(clients, lifecycle, yes_id=yes_id, no_id=no_id,
                   router=AffinityRouter(urls, load_factor=settings.vllm_load_factor),
                   scoring_api=settings.vllm_scoring_api, request_timeout_s=request_timeout_s,
                   health_interval_s=settings.vllm_health_interval_s, telemetry=telemetry)

    # --- ScoringEngine

    def score(self, adapter: UserAdapter | None, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
              deadline: float | None = None, interrupted: Callable[[], bool] | None = None,
              embeds=None) -> np.ndarray:
        """P(Yes) per suffix; ``deadline`` is a ``time.perf_counter()`` instant. ``interrupted`` is
        not consulted: the servers batch requests themselves, so background work never holds them.
        ``embeds`` (collaborative tokens) are refused: this engine sends token ids only."""
        if embeds is not None:
            raise ValueError("the vLLM engine takes no input embeddings (collaborative tokens)")
        if not suffixes:
            return np.zeros(0, dtype=np.float32)
        if any(len(s) == 0 for s in suffixes):
            raise ValueError("every candidate suffix needs at least one token")
        if deadline is None:
            deadline = time.perf_counter() + self.request_timeout_s
        user = split_key(adapter)[0] if adapter is not None else ""
        shared = adapter is not None and adapter.prototype is not None  # on every replica: no affinity
        prefix, suffixes = [int(t) for t in prefix], [[int(t) for t in s] for s in suffixes]
        failures: list[str] = []
        while True:
            if time.perf_counter() >= deadline:
                raise VLLMTimeout("the request deadline passed before a vLLM replica answered")
            # NoReplicaAvailable when every replica is down
            replica = self.router.least_loaded() if shared else self.router.route(user)
            self.router.acquire(replica)
            try:
                scores = self._score_on(self.replicas[replica], adapter, prefix, suffixes, deadline)
                self.last_replica = replica
                return np.asarray(scores, dtype=np.float32)
            except ReplicaUnavailable as exc:
                burst.log(logging.WARNING, f"replica:{replica}", "vLLM replica failed; routing elsewhere",
                          replica=replica, error=str(exc))
                self._mark_down(replica)
                failures.append(str(exc))
                if len(failures) >= len(self.replicas):
                    raise ReplicaUnavailable("; ".join(failures)) from exc
            finally:
                self.router.release(replica)

    # --- operations

    def preload(self, adapters: Sequence[UserAdapter]) -> None:
        """Load a version's prototype adapters on every replica that is up (pinned: never evicted
        while the version is recent; a replica down now gets them when it comes back)."""
        if not adapters:
            return
        self.lifecycle.pin(split_key(adapters[0])[1], adapters)
        for url, up in self.router.healthy().items():
            if up:
                self._load_pinned(url)

    def _load_pinned(self, url: str) -> None:
        replica = self.replicas[url]
        try:
            if not replica.ready:
                self._probe(replica)
            self.lifecycle.load_pinned(url, replica.client)
        except (ReplicaUnavailable, VLLMTimeout) as exc:
            burst.log(logging.WARNING, f"replica:{url}", "vLLM replica failed to preload adapters",
                      replica=url, error=str(exc))
            self._mark_down(url)
        except VLLMRequestError as exc:  # refused, not unreachable: requests load on demand and say why
            log.error("vLLM replica refused a prototype adapter", extra={"replica": url, "error": str(exc)})

    def expected_ms(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> float | None:
        """None: a remote server's time depends on its batch and cache, which this process cannot
        see; the client's deadline-bound timeout bounds the wait instead."""
        return None

    def replica_health(self) -> dict[str, bool]:
        """Replica URL -> whether it is taking requests (for /readyz)."""
        return self.router.healthy()

    def close(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        for replica in self.replicas.values():
            replica.client.close()

    # --- internals

    def _score_on(self, replica: _Replica, adapter: UserAdapter | None, prefix: list[int],
                  suffixes: list[list[int]], deadline: float) -> list[float]:
        if not replica.ready:
            self._probe(replica)
        for attempt in (0, 1):
            lease = nullcontext(replica.base_model) if adapter is None else \
                self.lifecycle.lease(replica.url, replica.client, adapter, deadline)
            with lease as model:
                try:
                    return self._call(replica, model, prefix, suffixes, deadline)
                except AdapterNotLoaded:
                    if adapter is None or attempt:
                        raise
                    # The server lost it (restarted, or another gateway unloaded it): load again.
                    self.lifecycle.forget(replica.url, model)
        raise AssertionError("unreachable")

    def _call(self, replica: _Replica, model: str, prefix: list[int], suffixes: list[list[int]],
              deadline: float) -> list[float]:
        timeout = deadline - time.perf_counter()
        if replica.api == "generative_scoring":
            return replica.client.generative_scoring(GenerativeScoringRequest(
                model=model, query=prefix, items=suffixes, label_token_ids=self.labels), timeout)
        return replica.client.completions(CompletionRequest(
            model=model, prompt=[prefix + s for s in suffixes], logprobs=len(self.labels),
            allowed_token_ids=self.labels), timeout)

    def _probe(self, replica: _Replica) -> None:
        """Learn the served model, the scoring route, and the adapters already loaded there."""
        with replica.lock:
            timeout = max(2.0, replica.client.connect_timeout_s)
            models = replica.client.models(timeout)
            if self.scoring_api == "auto":
                api = "generative_scoring" if replica.client.has_generative_scoring(timeout) else "completions"
            else:
                api = self.scoring_api
            if api == "completions":
                log.warning("vLLM replica lacks /generative_scoring: one completion per candidate "
                            "(start it with --logprobs-mode processed_logprobs)", extra={"replica": replica.url})
            self.lifecycle.forget(replica.url)  # whatever we believed, the server's list is the truth
            self.lifecycle.adopt(replica.url, models.adapters())
            replica.base_model, replica.api = models.base_model(), api

    def _probe_or_down(self, url: str) -> bool:
        try:
            self._probe(self.replicas[url])
        except Exception as exc:  # down at start-up is allowed: the monitor brings it back
            log.warning("vLLM replica not reachable", extra={"replica": url, "error": repr(exc)})
            self._mark_down(url)
            return False
        self.router.mark_up(url)
        self.telemetry.measure(Quantity.REPLICA_UP, 1, on=url)
        if self.lifecycle.pinned():  # back (or first reached): the prototypes before any request
            self._load_pinned(url)
        return self.router.healthy()[url]

    def _mark_down(self, url: str) -> None:
        self.router.mark_down(url)
        replica = self.replicas[url]
        replica.base_model = replica.api = None  # probe again when back: it may be another server
        self.lifecycle.forget(url)
        self.telemetry.measure(Quantity.REPLICA_UP, 0, on=url)

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            health = self.router.healthy()
            for url, replica in self.replicas.items():
                alive = replica.client.healthy(max(1.0, replica.client.connect_timeout_s))
                if alive and not health[url]:
                    if self._probe_or_down(url):
                        log.info("vLLM replica back", extra={"replica": url})
                elif not alive and health[url]:
                    log.warning("vLLM replica failed its health check", extra={"replica": url})
                    self._mark_down(url)
