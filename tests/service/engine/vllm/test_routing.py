import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from service.engine.vllm.routing import AffinityRouter, NoReplicaAvailable, RandomRouter

ROOT = Path(__file__).resolve().parents[4]
REPLICAS = [f"http://vllm-{i}:8000" for i in range(4)]
USERS = [f"u{i}" for i in range(10_000)]


def mapping(router, users=USERS):
    return {u: router.route(u) for u in users}


def test_same_mapping_across_instances_and_replica_order():
    a = mapping(AffinityRouter(REPLICAS))
    assert mapping(AffinityRouter(list(reversed(REPLICAS)))) == a
    assert mapping(AffinityRouter(REPLICAS)) == a


def test_same_mapping_in_another_process():
    users = USERS[:20]
    code = (
        "from service.engine.vllm.routing import AffinityRouter\n"
        f"r = AffinityRouter({REPLICAS!r})\n"
        f"print(','.join(r.route(u) for u in {users!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == [AffinityRouter(REPLICAS).route(u) for u in users]


def test_users_spread_evenly():
    shares = Counter(mapping(AffinityRouter(REPLICAS)).values())
    assert set(shares) == set(REPLICAS)
    # 64 virtual nodes per replica: each share within about +-25% of the fair 25%.
    assert max(shares.values()) / len(USERS) < 0.32
    assert min(shares.values()) / len(USERS) > 0.18


def test_removing_a_replica_moves_only_its_users():
    before = mapping(AffinityRouter(REPLICAS))
    after = mapping(AffinityRouter(REPLICAS[:3]))
    moved = {u for u in USERS if before[u] != after[u]}
    assert moved == {u for u in USERS if before[u] == REPLICAS[3]}
    # Its users spread over the survivors instead of all landing on one neighbour.
    assert len(set(after[u] for u in moved)) == 3


def test_down_replica_is_skipped_and_its_users_return_when_up():
    router = AffinityRouter(REPLICAS)
    before = mapping(router)
    router.mark_down(REPLICAS[1])
    assert router.healthy() == {r: r != REPLICAS[1] for r in REPLICAS}
    during = mapping(router)
    assert REPLICAS[1] not in during.values()
    assert all(during[u] == before[u] for u in USERS if before[u] != REPLICAS[1])
    router.mark_up(REPLICAS[1])
    assert mapping(router) == before


def test_all_down_raises():
    for router in (AffinityRouter(REPLICAS), RandomRouter(REPLICAS, seed=0)):
        for r in REPLICAS:
            router.mark_down(r)
        with pytest.raises(NoReplicaAvailable):
            router.route("u1")
        assert isinstance(NoReplicaAvailable(), RuntimeError)
        router.mark_up(REPLICAS[2])
        assert router.route("u1") == REPLICAS[2]


@pytest.mark.parametrize("load_factor", [1.0, 1.25, 2.0])
def test_in_flight_load_stays_under_the_bound(load_factor):
    router = AffinityRouter(REPLICAS, load_factor=load_factor)
    router.mark_down(REPLICAS[0])
    up = REPLICAS[1:]
    # One hot user sends everything: without the bound, one replica would hold all of it.
    for total in range(300):
        replica = router.route("hot-user")
        assert replica != REPLICAS[0]
        bound = -(-load_factor * (total + 1) // len(up))
        assert router.in_flight()[replica] < bound
        router.acquire(replica)
    loads = router.in_flight()
    assert loads[REPLICAS[0]] == 0
    assert max(loads.values()) <= -(-load_factor * 300 // len(up))
    assert sum(loads.values()) == 300


def test_idle_user_goes_back_to_its_replica_after_load_drains():
    router = AffinityRouter(REPLICAS)
    home = router.route("hot-user")
    held = []
    for _ in range(20):
        held.append(router.route("hot-user"))
        router.acquire(held[-1])
    assert len(set(held)) > 1
    for r in held:
        router.release(r)
    assert router.in_flight() == dict.fromkeys(REPLICAS, 0)
    assert router.route("hot-user") == home


def test_bad_calls_are_rejected():
    router = AffinityRouter(REPLICAS)
    with pytest.raises(ValueError):
        router.release(REPLICAS[0])
    with pytest.raises(KeyError):
        router.acquire("http://elsewhere:8000")
    with pytest.raises(ValueError):
        AffinityRouter([])
    with pytest.raises(ValueError):
        AffinityRouter(REPLICAS + REPLICAS[:1])
    with pytest.raises(ValueError):
        AffinityRouter(REPLICAS, load_factor=0.5)


def test_random_router_uses_only_up_replicas():
    router = RandomRouter(REPLICAS, seed=1)
    router.mark_down(REPLICAS[3])
    seen = Counter(router.route("u1") for _ in range(3000))
    assert set(seen) == set(REPLICAS[:3])
    assert min(seen.values()) > 800


@pytest.mark.parametrize("cls", [AffinityRouter, RandomRouter])
def test_concurrent_acquire_release_keeps_counts_consistent(cls):
    router = cls(REPLICAS)
    errors = []

    def work(t):
        try:
            for i in range(2000):
                r = router.route(f"u{(t * 7919 + i) % 500}")
                router.acquire(r)
                if t == 0 and i % 97 == 0:  # health flaps while others route
                    router.mark_down(REPLICAS[0])
                    router.mark_up(REPLICAS[0])
                router.release(r)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert router.in_flight() == dict.fromkeys(REPLICAS, 0)
    assert all(router.healthy().values())


def test_least_loaded_takes_the_idlest_up_replica_and_ties_in_turn():
    router = AffinityRouter(["a", "b", "c"])
    assert [router.least_loaded() for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    router.acquire("a")
    router.acquire("b")
    assert {router.least_loaded() for _ in range(4)} == {"c"}
    router.mark_down("c")
    assert router.least_loaded() in {"a", "b"}
    router.mark_down("a")
    router.mark_down("b")
    with pytest.raises(NoReplicaAvailable):
        router.least_loaded()
