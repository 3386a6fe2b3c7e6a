"""The vLLM engine's lifecycle, failover and wire handling against scripted servers (no vLLM needed).

httpx.MockTransport plays the servers: it records what the engine sends and answers like vLLM 0.32
(400 for an empty /generative_scoring body, 404 for an unknown model, 500 when broken).
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import torch

from service.engine.base import UserAdapter
from service.engine.vllm.adapters import NAME_PATTERN, AdapterLifecycle, AdapterWriter, ReplicaAdapterOutcome
from service.telemetry import NO_TELEMETRY
from tests.telemetry_support import RecordedTelemetry
from service.engine.vllm.client import ReplicaUnavailable, VLLMClient
from service.engine.vllm.engine import VLLMEngine
from service.engine.vllm.routing import NoReplicaAvailable
from service.llm.personalized_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

YES, NO = 5, 7


def adapter(user: str, seed: int, version: str = "v1") -> UserAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {f"model.layers.0.self_attn.{m}": (torch.randn(16, 4, generator=gen), torch.randn(4, 16, generator=gen))
               for m in ("q_proj", "v_proj")}
    return UserAdapter(f"{user}@{version}#{seed:012x}", weights, 2.0, user_id=user)


class FakeServer:
    """One scripted vLLM server: registered adapters, scores = 0.5 + index/100, switchable failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.adapters: dict[str, str] = {}
        self.broken = False
        self.calls: list[tuple[str, dict]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.broken:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        self.calls.append((path, body))
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            cards = [{"id": "base", "parent": None}] + [{"id": n, "parent": "base"} for n in self.adapters]
            return httpx.Response(200, json={"data": cards})
        if path == "/v1/load_lora_adapter":
            assert (body["lora_path"].rstrip("/").endswith(body["lora_name"]))
            self.adapters[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text="Success")
        if path == "/v1/unload_lora_adapter":
            if self.adapters.pop(body["lora_name"], None) is None:
                return httpx.Response(404, json={"error": {"message": "cannot be found", "code": 404}})
            return httpx.Response(200, text="Success")
        if path == "/generative_scoring":
            if not body:
                return httpx.Response(400, json={"error": {"message": "validation", "code": 400}})
            if body["model"] != "base" and body["model"] not in self.adapters:
                return httpx.Response(404, json={"error": {"message": "does not exist", "code": 404}})
            return httpx.Response(200, json={"model": body["model"], "data": [
                {"index": i, "score": 0.5 + i / 100} for i in range(len(body["items"]))]})
        return httpx.Response(404, json={"detail": "Not Found"})


def build(tmp_path, n_servers=1, capacity=2, telemetry=NO_TELEMETRY):
    servers = [FakeServer(f"http://replica-{i}:8000") for i in range(n_servers)]
    clients = [VLLMClient(s.url, transport=httpx.MockTransport(s.handler)) for s in servers]
    lifecycle = AdapterLifecycle(AdapterWriter(tmp_path / "adapters", base_model="base"), capacity,
                                  telemetry=telemetry)
    engine = VLLMEngine(clients, lifecycle, yes_id=YES, no_id=NO, health_interval_s=None)
    return engine, servers


def test_names_are_content_addressed_and_safe(tmp_path) -> None:
    writer = AdapterWriter(tmp_path, base_model="base")
    a = writer.write(adapter("alice@example.com/../x", 1))
    assert NAME_PATTERN.match(a.name) and a.path.parent == tmp_path and "/" not in a.name
    assert writer.write(adapter("alice@example.com/../x", 1)) == a  # same weights, same name
    assert writer.write(adapter("alice@example.com/../x", 2)).name != a.name  # other weights, never the same
    assert writer.write(adapter("alice@example.com/../x", 1, "v2")).name != a.name
    config = json.loads((a.path / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_modules"] == ["q_proj", "v_proj"]
    assert (a.path / ADAPTER_WEIGHTS).stat().st_size > 0


def test_lru_eviction_unloads_and_deletes_files(tmp_path) -> None:
    telemetry = RecordedTelemetry()
    engine, (server,) = build(tmp_path, telemetry=telemetry)
    users = [adapter(f"u{i}", i) for i in range(3)]
    for a in users[:2] + users[:1] + users[2:]:  # u0, u1, u0 (refresh), u2 -> evicts u1
        np.testing.assert_allclose(engine.score(a, [1, 2], [[3], [4]]), [0.5, 0.51], atol=1e-6)
    held = engine.lifecycle.resident(server.url)
    assert len(held) == 2 and held[0].startswith("u0.") and held[1].startswith("u2.")
    evicted = [on for outcome, _, on in telemetry.counts if outcome is ReplicaAdapterOutcome.EVICTED]
    assert sorted(server.adapters) == sorted(held) and evicted == [server.url]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == sorted(held)
    sent = [b for p, b in server.calls if p == "/generative_scoring" and b]
    assert sent[-1]["query"] == [1, 2] and sent[-1]["items"] == [[3], [4]] and sent[-1]["label_token_ids"] == [YES, NO]


def test_adapter_in_use_is_never_evicted(tmp_path) -> None:
    engine, (server,) = build(tmp_path, capacity=1)
    client = engine.replicas[server.url].client
    with engine.lifecycle.lease(server.url, client, adapter("busy", 1)) as busy:
        with engine.lifecycle.lease(server.url, client, adapter("other", 2)):
            assert busy in server.adapters  # over capacity rather than pulled from under a request
    engine.score(adapter("third", 3), [1], [[2]])
    assert busy not in server.adapters and len(server.adapters) == 1


def test_lost_adapter_is_loaded_again(tmp_path) -> None:
    engine, (server,) = build(tmp_path)
    a = adapter("u", 1)
    engine.score(a, [1], [[2]])
    server.adapters.clear()  # the server restarted
    assert engine.score(a, [1], [[2]]).shape == (1,)
    assert sum(p == "/v1/load_lora_adapter" for p, _ in server.calls) == 2


def test_failed_replica_is_marked_down_and_the_user_rerouted(tmp_path) -> None:
    engine, servers = build(tmp_path, n_servers=2)
    a = adapter("u", 1)
    engine.score(a, [1], [[2]])
    first = engine.last_replica
    broken = next(s for s in servers if s.url == first)
    broken.broken = True
    engine.score(a, [1], [[2]])
    assert engine.last_replica != first
    assert engine.replica_health() == {first: False, engine.last_replica: True}
    next(s for s in servers if s.url != first).broken = True
    with pytest.raises((ReplicaUnavailable, NoReplicaAvailable)):
        engine.score(a, [1], [[2]])
    with pytest.raises(NoReplicaAvailable):  # everything down: fail fast, the pipeline answers CRM-only
        engine.score(a, [1], [[2]])


def test_monitor_brings_a_replica_back(tmp_path) -> None:
    server = FakeServer("http://replica:8000")
    server.broken = True
    client = VLLMClient(server.url, transport=httpx.MockTransport(server.handler))
    lifecycle = AdapterLifecycle(AdapterWriter(tmp_path, base_model="base"), 2)
    engine = VLLMEngine([client], lifecycle, yes_id=YES, no_id=NO, health_interval_s=0.05)
    try:
        assert engine.replica_health() == {server.url: False}  # down at start: allowed
        server.broken = False
        deadline = time.monotonic() + 5
        while not engine.replica_health()[server.url]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert engine.score(None, [1], [[2], [3]]).shape == (2,)
    finally:
        engine.close()


def test_server_without_generative_scoring_uses_completions(tmp_path) -> None:
    class OldServer(FakeServer):
        def handler(self, request):
            if request.url.path == "/generative_scoring":
                return httpx.Response(404, json={"detail": "Not Found"})
            if request.url.path == "/v1/completions":
                body = json.loads(request.content)
                assert body["max_tokens"] == 1 and body["allowed_token_ids"] == [YES, NO]
                assert body["prompt"] == [[1, 2, 3], [1, 2, 4, 4]]
                lp = np.log([0.8, 0.2])
                return httpx.Response(200, json={"choices": [
                    {"index": i, "logprobs": {"top_logprobs": [{f"token_id:{YES}": lp[0], f"token_id:{NO}": lp[1]}]}}
                    for i in range(len(body["prompt"]))]})
            return super().handler(request)

    server = OldServer("http://old:8000")
    engine = VLLMEngine([VLLMClient(server.url, transport=httpx.MockTransport(server.handler))],
                        AdapterLifecycle(AdapterWriter(tmp_path, base_model="base"), 2), yes_id=YES, no_id=NO,
                        health_interval_s=None)
    assert engine.replicas[server.url].api == "completions"
    np.testing.assert_allclose(engine.score(None, [1, 2], [[3], [4, 4]]), [0.8, 0.8], atol=1e-6)


def prototype(index: int, version: str = "v1") -> UserAdapter:
    shared = adapter(f"p{index}", 100 + index, version)
    return UserAdapter(shared.key, shared.weights, shared.scaling, prototype=f"p{index}")


def loads(server: FakeServer) -> int:
    return sum(p == "/v1/load_lora_adapter" for p, _ in server.calls)


def test_prototypes_are_preloaded_everywhere_and_scoring_loads_none(tmp_path) -> None:
    engine, servers = build(tmp_path, n_servers=3, capacity=2)
    prototypes = [prototype(i) for i in range(5)]  # more than the capacity: pinned adapters are outside it
    engine.preload(prototypes)
    for server in servers:
        assert len(server.adapters) == 5 and loads(server) == 5
        assert all(NAME_PATTERN.match(n) and n.split(".")[:2] in ([f"p{i}", "v1"] for i in range(5))
                   for n in server.adapters)
    used = set()
    for i in range(60):  # many users, all sharing the five adapters, spread over the replicas
        engine.score(prototypes[i % 5], [1], [[2]])
        used.add(engine.last_replica)
    assert used == {s.url for s in servers} and all(loads(s) == 5 for s in servers)
    for i in range(3):  # exact users beside them evict each other, never a prototype
        engine.score(adapter(f"u{i}", i), [1], [[2]])
    assert all(len([n for n in s.adapters if n.startswith("p")]) == 5 for s in servers)
    engine.preload(prototypes)  # again (a rollback to the version): nothing to load
    assert sum(loads(s) for s in servers) == 15 + 3


def test_prototypes_go_to_the_least_loaded_replica(tmp_path) -> None:
    engine, servers = build(tmp_path, n_servers=2)
    engine.preload([prototype(0)])
    busy = servers[0].url
    engine.router.acquire(busy)
    try:
        for _ in range(4):
            engine.score(prototype(0), [1], [[2]])
            assert engine.last_replica == servers[1].url
    finally:
        engine.router.release(busy)


def test_a_replica_back_gets_the_prototypes_again(tmp_path) -> None:
    engine, servers = build(tmp_path, n_servers=2)
    prototypes = [prototype(i) for i in range(3)]
    engine.preload(prototypes)
    servers[0].broken = True
    engine.score(prototypes[0], [1], [[2]])  # tries it (least loaded, first in turn) or the other: either answers
    engine._mark_down(servers[0].url)
    servers[0].broken = False
    servers[0].adapters.clear()  # restarted empty
    assert engine._probe_or_down(servers[0].url)
    assert len(servers[0].adapters) == 3  # before any request reaches it


def test_an_old_versions_prototypes_become_evictable(tmp_path) -> None:
    engine, (server,) = build(tmp_path, capacity=1)
    for version in ("v1", "v2", "v3"):
        engine.preload([prototype(0, version)])
    assert len(server.adapters) == 3
    engine.score(adapter("u", 1), [1], [[2]])  # room for a user: v1's prototype goes, v2's and v3's stay
    assert sorted(n.split(".")[1] for n in server.adapters if n.startswith("p0")) == ["v2", "v3"]
