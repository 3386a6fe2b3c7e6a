"""``reclora prepare`` on a user's own CSV files and ``reclora load-histories`` against the real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import redis
from typer.testing import CliRunner

from tests.redis_support import REDIS_URL
from service.history import decode_records, events_key
from training.cli import app
from training.data.synthetic import generate_synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def book_files(tmp_path_factory) -> tuple[Path, Path]:
    """A book catalog without genres and its half-star ratings, two of them naming unknown books."""
    root = tmp_path_factory.mktemp("books")
    raw = generate_synthetic(n_users=40, n_items=30, n_interactions=600, seed=2, item_noun="book")
    ratings = raw.interactions.rename(columns={"user": "user_id", "item": "book_id"})
    ratings["rating"] = ratings["rating"] - 0.5 * (ratings.index % 2)  # 0.5 .. 5 stars
    unknown = pd.DataFrame({"user_id": [1, 2], "book_id": [900, 901], "rating": [4.0, 2.0],
                            "timestamp": [ratings["timestamp"].max() + 1] * 2})
    pd.concat([ratings, unknown]).to_csv(root / "ratings.csv", index=False)
    raw.items[["item", "title"]].rename(columns={"item": "book_id"}).to_csv(root / "books.csv", index=False)
    return root / "ratings.csv", root / "books.csv"


def prepare_args(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["prepare", "--format", "csv", "--interactions", str(files[0]), "--items", str(files[1]),
            "--user-col", "user_id", "--item-col", "book_id", "--genres-col", "", "--out", str(out), *extra]


def test_prepare_refuses_unknown_items_naming_file_line_item_and_flag(book_files, tmp_path) -> None:
    result = runner.invoke(app, prepare_args(book_files, tmp_path / "out", "--item-noun", "book"))
    assert result.exit_code == 2
    assert f"{book_files[0]} line 602: item 900 is not in books.csv" in result.output
    assert "--drop-unknown-items" in result.output
    assert not (tmp_path / "out").exists()


def test_prepare_a_book_catalog_without_flags_for_the_range(book_files, tmp_path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, prepare_args(book_files, out, "--item-noun", "book", "--drop-unknown-items"))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["rating_min"], meta["rating_max"]) == (0.5, 5.0)
    assert (meta["item_noun"], meta["item_plural"], meta["item_verb"]) == ("book", "books", "read")
    assert meta["dropped_rows"] == {"unknown_item": 2} and meta["n_interactions"] == 600
    assert "rating range 0.5..5 (lowest and highest in the file)" in result.output
    assert '"the user read the following books"' in result.output
    assert "dropped 2 rating rows naming items not in books.csv" in result.output
    items = pd.read_parquet(out / "items.parquet")
    assert items["genres"].eq("").all() and items["title"].str.startswith("Synthetic Book ").all()


def test_prepare_stated_bounds_override_the_data(book_files, tmp_path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, prepare_args(book_files, out, "--drop-unknown-items", "--rating-min", "0",
                                             "--rating-max", "5"))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["rating_min"], meta["rating_max"], meta["item_noun"]) == (0.0, 5.0, "movie")
    assert "rating range 0..5; items are movies" in result.output
    half = runner.invoke(app, prepare_args(book_files, out, "--drop-unknown-items", "--rating-min", "0"))
    assert half.exit_code == 0 and "rating range 0..5 (highest in the file)" in half.output
    refused = runner.invoke(app, prepare_args(book_files, out, "--drop-unknown-items", "--rating-max", "4"))
    assert refused.exit_code == 2 and "rating '4.5' is outside 0.5..4" in refused.output


def test_prepare_refuses_bad_item_words_and_words_for_movielens(book_files, tmp_path) -> None:
    bad = runner.invoke(app, prepare_args(book_files, tmp_path / "o", "--drop-unknown-items", "--item-noun", " "))
    assert bad.exit_code == 2 and "item noun ' '" in bad.output
    movielens = runner.invoke(app, ["prepare", "--format", "ml-100k", "--data-dir", str(tmp_path), "--out",
                                    str(tmp_path / "o"), "--item-noun", "book"])
    assert movielens.exit_code == 2 and "ml-100k is movies" in movielens.output


def test_prepare_synthetic_books(tmp_path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["prepare", "--format", "synthetic", "--out", str(out), "--n-users", "30",
                                 "--n-items", "20", "--n-interactions", "300", "--item-noun", "book"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "meta.json").read_text())["item_verb"] == "read"
    assert pd.read_parquet(out / "items.parquet")["title"].str.startswith("Synthetic Book ").all()


def test_load_histories_reads_the_gateways_redis_settings(tmp_path, redis_prefix) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["prepare", "--format", "synthetic", "--out", str(data), "--n-users", "25",
                               "--n-items", "20", "--n-interactions", "250"]).exit_code == 0
    env = {"RECLORA_REDIS_URL": REDIS_URL, "RECLORA_REDIS_PREFIX": redis_prefix}
    result = runner.invoke(app, ["load-histories", "--data", str(data)], env=env)
    assert result.exit_code == 0, result.output
    assert f"histories loaded into Redis at 127.0.0.1:6379 db 0, key prefix {redis_prefix!r}" in result.output
    client = redis.Redis.from_url(REDIS_URL)
    try:
        events = pd.read_parquet(data / "events.parquet")
        users = pd.read_parquet(data / "users.parquet")
        first = users.loc[users["user_idx"] == events["user_idx"].iloc[0], "user"].item()
        stored = decode_records(client.lrange(events_key(redis_prefix, str(first)), 0, -1))[0]
        assert len(stored) == int((events["user_idx"] == events["user_idx"].iloc[0]).sum()) > 0
        assert sum(1 for _ in client.scan_iter(match=f"{redis_prefix}*", count=1000)) == 3 * len(users)  # events, profile, event count
    finally:
        client.close()
    # an explicit flag wins over the environment
    other = f"{redis_prefix}other:"
    flagged = runner.invoke(app, ["load-histories", "--data", str(data), "--prefix", other], env=env)
    assert flagged.exit_code == 0 and f"key prefix {other!r}" in flagged.output


def test_load_histories_names_the_target_without_its_password(tmp_path) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["prepare", "--format", "synthetic", "--out", str(data), "--n-users", "25",
                               "--n-items", "20", "--n-interactions", "250"]).exit_code == 0
    result = runner.invoke(app, ["load-histories", "--data", str(data)],
                           env={"RECLORA_REDIS_URL": "redis://:hunter2@127.0.0.1:1/3", "RECLORA_REDIS_PREFIX": "x:"})
    assert result.exit_code == 2
    assert "cannot write histories to Redis at 127.0.0.1:1 db 3" in result.output and "hunter2" not in result.output
