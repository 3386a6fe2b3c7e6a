import torch

from service.engine.base import UserAdapter
from service.personalization.adapter_cache import AdapterCache, CacheEvents


def make(alphas: torch.Tensor, tag: str) -> UserAdapter:
    return UserAdapter(tag, {"m": (torch.zeros(4, 2), torch.zeros(2, 4))}, 2.0)  # 64 bytes


def test_hit_within_tolerance_miss_beyond() -> None:
    counts = {"hit": 0, "miss": 0, "evict": 0}
    events = CacheEvents(*(lambda k=k: counts.__setitem__(k, counts[k] + 1) for k in ("hit", "miss", "evict")))
    cache = AdapterCache(max_bytes=1000, drift_tol=0.05, events=events)
    a = torch.tensor([[0.5, 0.5]])
    first, cached = cache.get_or_build("u", "v1", a, lambda x: make(x, "first"))
    assert not cached and first.key == "first"
    again, cached = cache.get_or_build("u", "v1", a + 0.01, lambda x: make(x, "second"))
    assert cached and again.key == "first"
    moved, cached = cache.get_or_build("u", "v1", a + torch.tensor([[0.2, -0.2]]), lambda x: make(x, "third"))
    assert not cached and moved.key == "third"
    other_version, cached = cache.get_or_build("u", "v2", a, lambda x: make(x, "v2"))
    assert not cached and other_version.key == "v2"
    assert counts == {"hit": 1, "miss": 3, "evict": 0}


def test_evicts_least_recently_used_by_bytes() -> None:
    evicted = []
    cache = AdapterCache(max_bytes=200, events=CacheEvents(evict=lambda: evicted.append(1)))
    a = torch.tensor([[1.0]])
    for user in ("a", "b", "c"):
        cache.get_or_build(user, "v", a, lambda x, u=user: make(x, u))
    cache.get_or_build("a", "v", a, lambda x: make(x, "a2"))  # touch a: b is now oldest
    cache.get_or_build("d", "v", a, lambda x: make(x, "d"))
    assert len(evicted) == 1 and cache.nbytes <= 200
    assert cache.get_or_build("b", "v", a, lambda x: make(x, "b-new"))[0].key == "b-new"
    assert cache.get_or_build("a", "v", a, lambda x: make(x, "a3"))[0].key == "a"
    cache.drop_version("v")
    assert len(cache) == 0 and cache.nbytes == 0
