"""Prepared dataset -> raw-id histories -> the real Redis, checked against the raw interactions."""

from __future__ import annotations


import numpy as np
import pytest
from tests.knowledge_support import planted_vectors, write_knowledge
from tests.redis_support import REDIS_URL, scratch_prefix
import redis
from typer.testing import CliRunner

from service.history import bulk_load, decode_records, events_key, profile_key
from training.cli import app
from training.data.samples import prepare
from training.data.synthetic import generate_synthetic
from training.history_loader import histories_from_prepared, knowledge_records, split_start_order



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


def knowledge_dir(data, path, **meta):
    return write_knowledge(path, *planted_vectors(data, dim=32, seed=1), **meta)


def test_knowledge_records_count_the_events_before_the_cutoff(raw, data, tmp_path) -> None:
    cutoff = int(np.quantile(data.events["timestamp"], 0.6))
    directory = knowledge_dir(data, tmp_path / "knowledge", cutoff_timestamp=cutoff, generated_at=1.7e9)
    _, user_vectors, user_has = planted_vectors(data, dim=32, seed=1)
    records = dict(knowledge_records(data, directory))
    assert set(records) == {str(u) for u in data.users["user"]}
    inter = raw.interactions
    for user, idx in zip(data.users["user"], data.users["user_idx"]):
        record = records[str(user)]
        if not user_has[idx]:
            assert record is None
            continue
        mine = inter[inter["user"] == user]
        assert record.events_at == int((mine["timestamp"] < cutoff).sum())
        np.testing.assert_array_equal(record.vector, user_vectors[idx])
        assert record.encoder == "planted-test-encoder" and record.generated_at == 1.7e9
    assert any(r is None for r in records.values()) and any(r is not None and r.events_at for r in records.values())
    # replaying until a split counts only the events loaded
    cut = split_start_order(data, "valid")
    later = dict(knowledge_records(data, knowledge_dir(data, tmp_path / "k2", cutoff_timestamp=None),
                                   until_split="valid"))
    loaded = {u: len(items) for u, items, *_ in histories_from_prepared(data, until_split="valid")}
    assert cut and all(r.events_at == loaded[u] for u, r in later.items() if r is not None)


def test_cli_loads_knowledge_vectors_idempotently(raw, data, prefix, tmp_path) -> None:
    from service.history import decode_knowledge, knowledge_key

    data.save(tmp_path / "data")
    cutoff = int(np.quantile(data.events["timestamp"], 0.8))
    directory = knowledge_dir(data, tmp_path / "knowledge", cutoff_timestamp=cutoff)
    want = dict(knowledge_records(data, directory))
    args = ["load-histories", "--data", str(tmp_path / "data"), "--redis-url", REDIS_URL, "--prefix", prefix,
            "--knowledge", str(directory)]
    client = redis.Redis.from_url(REDIS_URL)
    n = sum(r is not None for r in want.values())
    for _ in range(2):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"knowledge vectors: {n} written, {len(want) - n} users without one" in result.output
        for user, record in want.items():
            stored_record = decode_knowledge(client.hgetall(knowledge_key(prefix, user)))
            if record is None:
                assert stored_record is None
            else:
                assert stored_record.events_at == record.events_at and stored_record.encoder == record.encoder
                np.testing.assert_array_equal(stored_record.vector, record.vector)


def test_cli_refuses_knowledge_of_another_dataset_before_writing(data, prefix, tmp_path) -> None:
    data.save(tmp_path / "data")
    other = prepare(generate_synthetic(n_users=25, n_items=60, n_interactions=800, seed=4))
    directory = knowledge_dir(other, tmp_path / "knowledge")
    result = CliRunner().invoke(app, ["load-histories", "--data", str(tmp_path / "data"), "--redis-url", REDIS_URL,
                                      "--prefix", prefix, "--knowledge", str(directory)])
    assert result.exit_code == 2
    assert "cannot load knowledge vectors" in result.output and "made for another dataset?" in result.output
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{prefix}*"))
    missing = CliRunner().invoke(app, ["load-histories", "--data", str(tmp_path / "data"), "--redis-url", REDIS_URL,
                                       "--prefix", prefix, "--knowledge", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a knowledge directory" in missing.output


def test_cli_loads_into_a_cluster_named_by_the_gateways_settings(raw, data, redis_cluster, tmp_path) -> None:
    data.save(tmp_path)
    env = {"RECLORA_REDIS_URL": redis_cluster.url, "RECLORA_REDIS_CLUSTER": "true"}  # as the gateway reads them
    with scratch_prefix(target=redis_cluster.target) as prefix:
        result = CliRunner().invoke(app, ["load-histories", "--data", str(tmp_path), "--prefix", prefix], env=env)
        assert result.exit_code == 0, result.output
        assert f'"events": {len(raw.interactions)}' in result.output and "(cluster)" in result.output
        client = redis_cluster.target.client()
        try:
            for user, (items, _, stamps) in expected_per_user(raw).items():
                stored_items, _, stored_stamps = decode_records(client.lrange(events_key(prefix, user), 0, -1))
                assert (stored_items.tolist(), stored_stamps.tolist()) == (items, stamps)
        finally:
            client.close()


def test_cli_reports_an_unreachable_cluster_in_one_line(data, tmp_path) -> None:
    data.save(tmp_path)
    result = CliRunner().invoke(app, ["load-histories", "--data", str(tmp_path), "--redis-cluster",
                                      "--redis-url", "redis://:secret@127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "cannot write histories to Redis at 127.0.0.1:1 db 0 (cluster)" in result.output
    assert "secret" not in result.output
