"""Prepared dataset -> raw-id histories -> the real Redis, checked against the raw interactions."""

from __future__ import annotations


import numpy as np
import pytest
from redis_support import REDIS_URL, scratch_prefix
import redis
from typer.testing import CliRunner

from service.history import bulk_load, decode_records, events_key, profile_key
from training.cli import app
from training.data.samples import prepare
from training.data.synthetic import generate_synthetic
from training.history_loader import histories_from_prepared, split_start_order



@pytest.fixture(scope="module")
def raw():
    return generate_synthetic(n_users=40, n_items=60, n_interactions=1500, seed=3)


@pytest.fixture(scope="module")
def data(raw):
    return prepare(raw)


@pytest.fixture
def prefix():
    with scratch_prefix() as value:
        yield value


def expected_per_user(raw, until_order: int | None = None) -> dict[str, tuple[list, list, list]]:
    """Ground truth straight from the raw interactions, in the protocol's global order."""
    inter = raw.interactions.sort_values(["timestamp", "user", "item"], kind="stable").reset_index(drop=True)
    if until_order is not None:
        inter = inter.iloc[:until_order]
    return {str(user): (g["item"].tolist(), g["rating"].astype(np.float32).tolist(), g["timestamp"].tolist())
            for user, g in inter.groupby("user")}


def stored(prefix: str, user: str) -> tuple[list, list, list, dict]:
    client = redis.Redis.from_url(REDIS_URL)
    items, ratings, stamps = decode_records(client.lrange(events_key(prefix, user), 0, -1))
    profile = {k.decode(): v.decode() for k, v in client.hgetall(profile_key(prefix, user)).items()}
    return items.tolist(), ratings.tolist(), stamps.tolist(), profile


def test_histories_are_raw_ids_in_time_order(raw, data) -> None:
    rows = list(histories_from_prepared(data))
    assert len(rows) == len(data.users)
    want = expected_per_user(raw)
    users = raw.users.set_index("user")
    for user, items, ratings, stamps, profile in rows:
        assert (items.tolist(), ratings.tolist(), stamps.tolist()) == want.get(user, ([], [], []))
        assert profile == {c: str(v) for c, v in users.loc[int(user)].items()}
        assert "user" not in profile and "user_idx" not in profile


@pytest.mark.parametrize("split,first", [("valid", "valid"), ("test", "test")])
def test_until_split_stops_before_the_split(raw, data, split, first) -> None:
    cut = split_start_order(data, split)
    ratios = data.meta["ratios"]
    assert cut == round(len(raw.interactions) * (ratios[0] + (ratios[1] if split == "test" else 0.0)))
    assert data.samples.loc[data.samples["order"] >= cut, "split"].astype(str).isin(
        ["valid", "test"] if split == "valid" else ["test"]).all()
    want = expected_per_user(raw, cut)
    rows = list(histories_from_prepared(data, until_split=split))
    assert sum(len(r[1]) for r in rows) == cut
    for user, items, ratings, stamps, _ in rows:
        assert (items.tolist(), ratings.tolist(), stamps.tolist()) == want.get(user, ([], [], []))


def test_unknown_until_split_is_rejected(data) -> None:
    with pytest.raises(ValueError, match="until_split"):
        list(histories_from_prepared(data, until_split="train"))


def test_bulk_load_matches_per_user_events(raw, data, prefix) -> None:
    rows = list(histories_from_prepared(data))
    counts = bulk_load(REDIS_URL, rows, prefix=prefix, max_events=30, batch_users=7, progress=False)
    lengths = [len(r[1]) for r in rows]
    assert counts == {"users": len(rows), "events": sum(min(n, 30) for n in lengths),
                      "truncated": sum(max(n - 30, 0) for n in lengths), "profiles": len(rows)}
    for user, items, ratings, stamps, profile in rows:
        assert stored(prefix, user) == (items[-30:].tolist(), ratings[-30:].tolist(), stamps[-30:].tolist(), profile)


def test_cli_loads_idempotently_and_replays_until_test(raw, data, prefix, tmp_path) -> None:
    runner = CliRunner()
    data.save(tmp_path)
    args = ["load-histories", "--data", str(tmp_path), "--redis-url", REDIS_URL, "--prefix", prefix]
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f'"events": {len(raw.interactions)}' in result.output and "wall time" in result.output
    snapshot = {u: stored(prefix, u) for u in expected_per_user(raw)}
    assert all(len(snapshot[u][0]) == len(items) for u, (items, _, _) in expected_per_user(raw).items())

    result = runner.invoke(app, args + ["--until-split", "test"])
    assert result.exit_code == 0, result.output
    cut = split_start_order(data, "test")
    for user, (items, ratings, stamps) in expected_per_user(raw, cut).items():
        assert stored(prefix, user)[:3] == (items, ratings, stamps)


def test_cli_reports_unreachable_redis_in_one_line(data, tmp_path) -> None:
    data.save(tmp_path)
    result = CliRunner().invoke(app, ["load-histories", "--data", str(tmp_path),
                                      "--redis-url", "redis://:secret@127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "cannot write histories to Redis at 127.0.0.1:1" in result.output
    assert "secret" not in result.output


def test_cli_rejects_an_unknown_split(data, tmp_path) -> None:
    data.save(tmp_path)
    result = CliRunner().invoke(app, ["load-histories", "--data", str(tmp_path), "--until-split", "train"])
    assert result.exit_code == 2 and "--until-split" in result.output
