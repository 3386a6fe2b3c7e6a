"""User-affinity routing across vLLM replicas.

Each vLLM server keeps a bounded LRU of loaded adapters (``--max-loras`` on the GPU,
``--max-cpu-loras`` in host memory). A user whose requests always reach the same replica finds
the adapter already loaded there, and the replicas together cache N times as many adapters as
one; random routing makes every replica cache the same hot users and load everyone else's
adapter again on each miss.

``AffinityRouter`` implements consistent hashing with bounded loads (Mirrokni, Thorup and
Zadimoghaddam, SODA 2018; the scheme behind HAProxy's ``hash-balance-factor`` and Google Cloud
load balancing): a user walks clockwise around a hash ring from its own hash and takes the first
replica that is up and whose in-flight count is below ``ceil(load_factor * (total + 1) / n_up)``.
Idle, a user always lands on the same replica; a hot user spills to the next replica on the ring
instead of queueing behind its own requests; removing a replica moves only that replica's users.
The load factor trades stickiness for balance, and the bound is tight when few requests are in
flight per replica: with 32 in flight over 8 replicas, 1.25 sends 41% of Zipf traffic away from
its home replica and 2 only 8% (``benchmarks/bench_routing.py``).

A prototype adapter (``service.llm.prototypes``) is loaded on every replica ahead of time, so its
users need no affinity: ``least_loaded`` sends each such request to the up replica with the fewest
in flight (ties in turn), the best balance any router can give.

Call ``route`` (or ``least_loaded``) then ``acquire`` before sending a request and ``release``
when it completes. The two are separate calls, so under contention a replica can briefly exceed
the bound by the number of threads racing on it; the bound steers traffic, it is not an
admission limit.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import threading

__all__ = ["AffinityRouter", "NoReplicaAvailable", "RandomRouter", "stable_hash"]


class NoReplicaAvailable(RuntimeError):
    """Every replica is marked down."""


def stable_hash(key: str) -> int:
    """64-bit hash that is the same in every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class _ReplicaSet:
    """Health flags and in-flight counts per replica, guarded by one lock."""

    def __init__(self, replicas: list[str]) -> None:
        if not replicas:
            raise ValueError("at least one replica is required")
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"duplicate replicas in {replicas}")
        self._replicas = list(replicas)
        self._up = {r: True for r in replicas}
        self._load = dict.fromkeys(replicas, 0)
        self._turn = 0  # where the next tie among least-loaded replicas starts
        self._lock = threading.Lock()

    def _check(self, replica: str) -> None:
        if replica not in self._up:
            raise KeyError(f"unknown replica {replica!r}")

    def acquire(self, replica: str) -> None:
        """Count one in-flight request on ``replica``."""
        with self._lock:
            self._check(replica)
            self._load[replica] += 1

    def release(self, replica: str) -> None:
        """Count one in-flight request on ``replica`` as finished."""
        with self._lock:
            self._check(replica)
            if self._load[replica] <= 0:
                raise ValueError(f"release without acquire on {replica!r}")
            self._load[replica] -= 1

    def least_loaded(self) -> str:
        """The up replica with the fewest requests in flight, ties taken in turn: for requests whose
        adapter every replica holds, where stickiness buys nothing."""
        with self._lock:
            n = len(self._replicas)
            order = [self._replicas[(self._turn + i) % n] for i in range(n)]
            up = [r for r in order if self._up[r]]
            if not up:
                raise NoReplicaAvailable(f"all {n} replicas are down")
            self._turn = (self._turn + 1) % n
            return min(up, key=self._load.__getitem__)

    def mark_down(self, replica: str) -> None:
        """Stop routing to ``replica``; its users go to their next replica on the ring meanwhile."""
        with self._lock:
            self._check(replica)
            self._up[replica] = False

    def mark_up(self, replica: str) -> None:
        """Route to ``replica`` again; its users come back to it."""
        with self._lock:
            self._check(replica)
            self._up[replica] = True

    def healthy(self) -> dict[str, bool]:
        """Replica -> whether it is up (a copy)."""
        with self._lock:
            return dict(self._up)

    def in_flight(self) -> dict[str, int]:
        """Replica -> requests acquired and not yet released (a copy)."""
        with self._lock:
            return dict(self._load)


class AffinityRouter(_ReplicaSet):
    """Consistent hashing with bounded loads: sticky users, no replica far above the mean load."""

    def __init__(self, replicas: list[str], *, load_factor: float = 1.25, vnodes: int = 64) -> None:
        super().__init__(replicas)
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1 (1 forces perfect balance, larger keeps users sticky)")
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.load_factor = load_factor
        # Several points per replica even out the arc lengths, hence the share of users per replica.
        # Sorting on (hash, replica) keeps the ring identical whatever the order of ``replicas``.
        ring = sorted((stable_hash(f"{r}#{i}"), r) for r in replicas for i in range(vnodes))
        self._points = [h for h, _ in ring]
        self._owners = [r for _, r in ring]

    def _bound(self) -> int:
        """Largest in-flight count a replica may hold and still take a new request, plus one."""
        up = [r for r in self._replicas if self._up[r]]
        total = sum(self._load[r] for r in up)
        # ceil(c (m+1) / n) * n >= m + 1 > m: some up replica is always below the bound.
        return math.ceil(self.load_factor * (total + 1) / len(up))

    def route(self, user_id: str) -> str:
        """The replica for ``user_id``: its first replica clockwise that is up and below the bound."""
        start = bisect.bisect(self._points, stable_hash(user_id))
        n = len(self._points)
        with self._lock:
            if not any(self._up.values()):
                raise NoReplicaAvailable(f"all {len(self._replicas)} replicas are down")
            bound = self._bound()
            seen: set[str] = set()
            for i in range(start, start + n):
                replica = self._owners[i % n]
                if replica in seen:
                    continue
                if self._up[replica] and self._load[replica] < bound:
                    return replica
                seen.add(replica)
                if len(seen) == len(self._replicas):
                    break
        raise AssertionError("unreachable: the load bound always leaves an up replica below it")


class RandomRouter(_ReplicaSet):
    """Uniform random choice among up replicas: the baseline that affinity routing is measured against."""

    def __init__(self, replicas: list[str], *, seed: int | None = None) -> None:
        super().__init__(replicas)
        self._rng = random.Random(seed)

    def route(self, user_id: str) -> str:
        """A replica chosen uniformly among those that are up; ``user_id`` is ignored."""
        with self._lock:
            up = [r for r in self._replicas if self._up[r]]
            if not up:
                raise NoReplicaAvailable(f"all {len(self._replicas)} replicas are down")
            return self._rng.choice(up)
