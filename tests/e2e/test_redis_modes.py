"""The gateway end to end on each kind of history store: the session's single node and its Redis
Cluster (3 masters, 3 replicas), the same flows on both.

Each store gets the world's histories under a key prefix of this module's own, loaded with the
bulk loader, and a gateway with the LLM score cache, the served-score log split over 4 shards
and online evaluation: scores read the stored history, events append and read back through
``/v1/users``, a repeated request reads its LLM scores from the cache, and an event labels a
served score, which reaches the online metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from service.api.admin.auth import new_token
from service.config import OnlineSettings
from service.nearline.served_log import ServedLog
from tests.e2e.e2e_support import LiveServer, World, metric_value, wait_for
from tests.redis_support import SINGLE, RedisTarget, scratch_prefix

CANDIDATES = [3, 17, 42, 58, 71, 80]
SHARDS = 4
CRM_SCORES: dict[str, list[float]] = {}  # by user, from the store tested first: the other must agree


@pytest.fixture(scope="module", params=["single", "cluster"])
def target(request) -> RedisTarget:
    return request.getfixturevalue("redis_cluster").target if request.param == "cluster" else SINGLE


@pytest.fixture(scope="module")
def token() -> tuple[str, str]:
    return new_token()


@pytest.fixture(scope="module")
def prefix(world: World, target: RedisTarget) -> Iterator[str]:
    with scratch_prefix("modes", target) as p:
        world.load_histories(target, p)
        yield p


@pytest.fixture(scope="module")
def client(world: World, target: RedisTarget, prefix: str, token) -> Iterator[httpx.Client]:
    """An admin's client of a gateway on ``target`` (the gateway stops with it)."""
    server = LiveServer.start(world.settings(
        target, redis_prefix=prefix, llm_score_cache=True, served_log_shards=SHARDS, online_eval_interval_s=0.1,
        admin_enabled=True, admin_token_sha256=[token[1]]))
    try:
        with server.client(token=token[0]) as c:
            yield c
    finally:
        server.stop()


def score(client: httpx.Client, user: str, candidates=CANDIDATES) -> dict:
    response = client.post("/v1/score", json={"user_id": user, "candidates": candidates, "deadline_ms": 20_000})
    assert response.status_code == 200, response.text
    return response.json()


def test_scores_read_each_users_stored_history(client, world: World):
    for user in world.users[:6]:  # on every master of the cluster
        stored = client.get(f"/v1/users/{user}/history", params={"limit": 1000}).json()
        assert [e["item_id"] for e in stored["events"]] == world.histories[user][0].tolist()[::-1]
        body = score(client, user)
        assert body["degraded"] is False and body["cold_start"] is False, body
        crm = [s["crm_score"] for s in body["scores"]]
        assert crm == pytest.approx(CRM_SCORES.setdefault(user, crm), abs=1e-5)  # the same history read


def test_events_append_and_read_back(client):
    user, now = f"modes-new-{time.time_ns()}", int(time.time())
    response = client.post("/v1/events", json={"user_id": user, "events": [
        {"item_id": item, "rating": 4.0, "timestamp": now + i} for i, item in enumerate(CANDIDATES[:3])]})
    assert response.status_code == 200, response.text
    assert response.json() == {"appended": 3, "history_length": 3}
    stored = client.get(f"/v1/users/{user}/history").json()
    assert [e["item_id"] for e in stored["events"]] == CANDIDATES[:3][::-1]
    assert score(client, user)["cold_start"] is False


def test_a_repeated_request_reads_its_llm_scores_from_the_cache(client, world: World):
    user = world.users[7]
    fresh = score(client, user)
    again = score(client, user)
    assert fresh["degraded"] is False and "llm" in fresh["timings"]
    assert "llm" not in again["timings"] and "llm_cache" in again["timings"]
    assert [s["llm_score"] for s in again["scores"]] == [s["llm_score"] for s in fresh["scores"]]


def test_an_event_labels_a_served_score_and_reaches_the_online_metrics(client, world: World, target: RedisTarget,
                                                                     prefix: str):
    user = world.users[9]
    log = ServedLog(None, OnlineSettings(served_log_shards=SHARDS), prefix=prefix)  # its key names only
    sync = target.client()
    try:
        body = score(client, user)
        wait_for(lambda: sync.hexists(log.user_key(user), str(CANDIDATES[1])), 10, "served score indexed")
        served_shard = log.stream_keys[log.shard(user)]
        assert any(f[b"u"].decode() == user for _, f in sync.xrange(served_shard))
        response = client.post("/v1/events", json={"user_id": user, "events": [
            {"item_id": CANDIDATES[1], "rating": 5.0, "timestamp": int(time.time())}]})
        assert response.status_code == 200, response.text
        labels_shard = log.labels_keys[log.shard(user)]
        wait_for(lambda: any(f[b"u"].decode() == user for _, f in sync.xrange(labels_shard)), 10, "label written")

        def labelled() -> float:
            report = client.get("/admin/v1/online", params={"window_s": 3600}).json()
            return sum(v["labels"] for v in report["versions"] if v["version"] == body["model_version"])

        wait_for(lambda: labelled() >= 1, 10, "the label in the online metrics")
        assert metric_value(client.get("/metrics").text, "reclora_online_labels_total", {"outcome": "joined"}) >= 1
    finally:
        sync.close()
