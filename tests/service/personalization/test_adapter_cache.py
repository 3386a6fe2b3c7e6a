import torch

from service.config import AdapterCacheSettings
from service.engine.base import UserAdapter
from service.personalization.adapter_cache import AdapterCache, AdapterCacheOutcome
from tests.telemetry_support import RecordedTelemetry


def make(alphas: torch.Tensor, tag: str) -> UserAdapter:
    return UserAdapter(tag, {"m": (torch.zeros(4, 2), torch.zeros(2, 4))}, 2.0)  # 64 bytes


def test_hit_within_tolerance_miss_beyond() -> None:
    telemetry = RecordedTelemetry()
    cache = AdapterCache(AdapterCacheSettings(adapter_cache_bytes=1000, adapter_drift_tol=0.05), telemetry)
    a = torch.tensor([[0.5, 0.5]])
    first, cached = cache.get_or_build("u", "v1", a, lambda x: make(x, "first"))
    assert not cached and first.key == "first"
    again, cached = cache.get_or_build("u", "v1", a + 0.01, lambda x: make(x, "second"))
    assert cached and again.key == "first"
    moved, cached = cache.get_or_build("u", "v1", a + torch.tensor([[0.2, -0.2]]), lambda x: make(x, "third"))
    assert not cached and moved.key == "third"
    other_version, cached = cache.get_or_build("u", "v2", a, lambda x: make(x, "v2"))
    assert not cached and other_version.key == "v2"
    counts = {o.value: telemetry.total(o) for o in AdapterCacheOutcome}
    assert counts == {"hit": 1, "miss": 3, "evict": 0}


def test_evicts_least_recently_used_by_bytes() -> None:
    telemetry = RecordedTelemetry()
    cache = AdapterCache(AdapterCacheSettings(adapter_cache_bytes=200), telemetry)
    a = torch.tensor([[1.0]])
    for user in ("a", "b", "c"):
        cache.get_or_build(user, "v", a, lambda x, u=user: make(x, u))
    cache.get_or_build("a", "v", a, lambda x: make(x, "a2"))  # touch a: b is now oldest
    cache.get_or_build("d", "v", a, lambda x: make(x, "d"))
    evicted = [o for o in telemetry.of(AdapterCacheOutcome) if o is AdapterCacheOutcome.EVICT]
    assert len(evicted) == 1 and cache.nbytes <= 200
    assert cache.get_or_build("b", "v", a, lambda x: make(x, "b-new"))[0].key == "b-new"
    assert cache.get_or_build("a", "v", a, lambda x: make(x, "a3"))[0].key == "a"
    cache.drop_version("v")
    assert len(cache) == 0 and cache.nbytes == 0
