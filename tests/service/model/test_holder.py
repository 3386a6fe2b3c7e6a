"""The canary's assignment of users and the holder's snapshots: stable, proportional, one read."""

from __future__ import annotations

import dataclasses

import pytest

from service.model import ModelHolder, load_model
from service.model.holder import BUCKETS, Canary, ModelSnapshot, user_bucket

USERS = [f"user-{i}" for i in range(20_000)]


@pytest.fixture(scope="module")
def models(world):
    stable = load_model(world.bundle_dir)
    return stable, dataclasses.replace(stable, version="cand-v2")


def test_the_bucket_is_a_fixed_function_of_user_and_candidate():
    # Pinned values: a process-salted hash (Python's hash()) or another digest would move users
    # between sides on every restart or deploy.
    assert (user_bucket("1", "v2"), user_bucket("alice", "v2"), user_bucket("alice", "v3")) == (8321, 4458, 5984)
    assert all(0 <= user_bucket(u, "v2") < BUCKETS for u in USERS[:1000])


@pytest.mark.parametrize("percent", [1.0, 10.0, 50.0, 90.0])
def test_the_share_of_users_follows_the_percent(models, percent):
    _, candidate = models
    canary = Canary(ModelSnapshot(candidate, None), percent)
    share = sum(canary.assigned(u) for u in USERS) / len(USERS)
    assert share == pytest.approx(percent / 100, abs=0.012)  # > 3 sigma of 20 000 fair draws


def test_a_larger_share_only_adds_users_and_candidates_draw_their_own(models):
    _, candidate = models
    small = {u for u in USERS if Canary(ModelSnapshot(candidate, None), 10).assigned(u)}
    large = {u for u in USERS if Canary(ModelSnapshot(candidate, None), 30).assigned(u)}
    other = {u for u in USERS if Canary(ModelSnapshot(dataclasses.replace(candidate, version="cand-v3"), None),
                                        10).assigned(u)}
    assert small < large
    assert len(small & other) < 0.2 * len(small)  # independent draws: ~10 % overlap


def test_routing_live_shadow_and_the_end_of_a_canary(models):
    stable, candidate = models
    holder = ModelHolder(stable, None)
    user_in = next(u for u in USERS if user_bucket(u, "cand-v2") < 2500)
    user_out = next(u for u in USERS if user_bucket(u, "cand-v2") >= 2500)
    assert holder.snapshot().route(user_in)[0] is holder.snapshot()  # no canary: the snapshot itself

    holder.start_canary(candidate, None, 25, shadow=False)
    snap = holder.snapshot()
    assert snap.version == stable.version and holder.version == stable.version
    served, shadow = snap.route(user_in)
    assert (served.version, shadow) == ("cand-v2", None)
    served, shadow = snap.route(user_out)
    assert (served.version, shadow) == (stable.version, None) and served.canary is None

    holder.start_canary(candidate, None, 25, shadow=True)
    served, shadow = holder.snapshot().route(user_in)
    assert (served.version, shadow.version) == (stable.version, "cand-v2")
    assert snap.route(user_in)[0].version == "cand-v2"  # a snapshot taken earlier keeps its routing

    ended = holder.end_canary(withdraw=True)
    assert ended.version == "cand-v2" and holder.canary is None and holder.withdrawn("cand-v2")
    assert holder.snapshot().route(user_in) == (holder.snapshot(), None)
    holder.start_canary(candidate, None, 25, shadow=False)  # a rerun routes to it again
    assert not holder.withdrawn("cand-v2")

    previous = holder.swap(candidate, None)  # promotion: the candidate is the stable version
    assert previous.version == stable.version and holder.canary is None and holder.version == "cand-v2"
    with pytest.raises(ValueError, match="stable version"):
        holder.start_canary(candidate, None, 10, shadow=False)


def test_an_activation_during_a_canary_keeps_it(models):
    stable, candidate = models
    holder = ModelHolder(stable, None)
    holder.start_canary(candidate, None, 50, shadow=False)
    holder.swap(dataclasses.replace(stable, version="other-v1"), None)
    assert holder.version == "other-v1" and holder.canary.candidate.version == "cand-v2"
