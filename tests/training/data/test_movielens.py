from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from training.data.errors import DataFormatError
from training.data.loaders import load_dataset
from training.data.movielens import ML100K_GENRES, load_ml100k, load_ml1m

REAL_ML100K = Path("/work/shared/data/ml-100k")


def item_line(item, title="Toy Story (1995)", date="01-Jan-1995", genres=("Animation",),
              flag="1") -> str:
    flags = [flag if name in genres else "0" for name in ML100K_GENRES]
    return "|".join([str(item), title, date, "", "http://example.org/x", *flags])


ML100K = {
    "u.data": ["1\t1\t5\t881250949", "1\t2\t3\t881250950", "2\t1\t4\t881250951"],
    "u.item": [
        item_line(1, genres=("Animation", "Children's", "Comedy")),
        item_line(2, "Land Before Time III (1995) (V)", "20-Feb-1995", ("unknown", "Drama")),
        item_line(3, "unknown", "", ("unknown",)),
    ],
    "u.user": ["1|24|M|technician|85711", "2|53|F|other|94043"],
    "u.genre": [f"{name}|{i}" for i, name in enumerate(ML100K_GENRES)] + [""],
}

ML1M = {
    "ratings.dat": ["1::1193::5::978300760", "1::661::3::978302109", "2::1193::4::978298413"],
    "movies.dat": [
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        "661::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",
        "3::Misérables, Les (1995)::Drama|Musical",
    ],
    "users.dat": ["1::F::1::10::48067", "2::M::56::16::70072"],
}


def write_files(root: Path, files: dict[str, list[str]], encoding: str = "latin-1") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (root / name).write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return root


def with_line(files: dict[str, list[str]], name: str, index: int, line: str | None):
    changed = {k: list(v) for k, v in files.items()}
    if line is None:
        del changed[name][index]
    else:
        changed[name][index] = line
    return changed


def assert_error(err: DataFormatError, path: Path, line: int | None, problem: str) -> None:
    assert isinstance(err, DataFormatError)
    assert err.path == path and err.line == line
    where = f"{path}" if line is None else f"{path} line {line}"
    assert str(err).startswith(f"{where}: "), str(err)
    assert problem in err.problem, str(err)


def assert_schema(ds) -> None:
    assert list(ds.interactions.columns) == ["user", "item", "rating", "timestamp"]
    assert [str(t) for t in ds.interactions.dtypes] == ["int64", "int64", "float64", "int64"]
    assert list(ds.items.columns[:4]) == ["item", "title", "genres", "year"]
    assert str(ds.items["item"].dtype) == "int64" and str(ds.items["year"].dtype) == "Int64"
    assert ds.items["item"].is_unique and ds.users["user"].is_unique
    assert pd.api.types.is_string_dtype(ds.items["title"])
    assert pd.api.types.is_string_dtype(ds.items["genres"])


# ---------------------------------------------------------------- ML-100K


def test_ml100k_small_files(tmp_path):
    ds = load_ml100k(write_files(tmp_path, ML100K))
    assert_schema(ds)
    assert ds.name == "ml-100k" and (ds.rating_min, ds.rating_max) == (1.0, 5.0)
    assert ds.interactions["rating"].tolist() == [5.0, 3.0, 4.0]
    items = ds.items.set_index("item")
    assert items.loc[1, "title"] == "Toy Story" and items.loc[1, "year"] == 1995
    assert items.loc[1, "genres"] == "Animation|Children's|Comedy"
    # No trailing year in the title: year falls back to the release date, title kept whole.
    assert items.loc[2, "title"] == "Land Before Time III (1995) (V)"
    assert items.loc[2, "year"] == 1995 and items.loc[2, "genres"] == "Drama"
    assert items.loc[3, "genres"] == "" and pd.isna(items.loc[3, "year"])
    assert ds.users.to_dict("records") == [
        {"user": 1, "gender": "male", "age": "18-24", "occupation": "technician"},
        {"user": 2, "gender": "female", "age": "50-55", "occupation": "other"},
    ]


def test_ml100k_without_genre_file_uses_standard_names(tmp_path):
    files = {k: v for k, v in ML100K.items() if k != "u.genre"}
    ds = load_ml100k(write_files(tmp_path, files))
    assert ds.items.loc[0, "genres"] == "Animation|Children's|Comedy"


def test_ml100k_age_buckets(tmp_path):
    ages = [7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73]
    users = [f"{i}|{age}|M|other|0" for i, age in enumerate(ages, start=1)]
    ds = load_ml100k(write_files(tmp_path, {**ML100K, "u.user": users}))
    assert ds.users["age"].tolist() == [
        "under 18", "under 18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44",
        "45-49", "45-49", "50-55", "50-55", "56+", "56+",
    ]


ML100K_BAD = [
    ("u.data", 1, "1\t2\t3", 2, "expected 4 fields separated by '\\t', found 3"),
    ("u.data", 1, "1\t2\t3\t4\t5", 2, "expected 4 fields"),
    ("u.data", 2, "2\t1\tx\t881250951", 3, "rating 'x' is not a number"),
    ("u.data", 1, "1\t2\t6\t881250950", 2, "rating '6' is outside 1..5"),
    ("u.data", 1, "1\t2\t0\t881250950", 2, "rating '0' is outside 1..5"),
    ("u.data", 1, "1\t2\t3.5\t881250950", 2, "rating '3.5' is not a whole number"),
    ("u.data", 1, "1\t2\t\t881250950", 2, "rating is missing"),
    ("u.data", 0, "abc\t1\t5\t881250949", 1, "user id 'abc' is not an integer"),
    ("u.data", 1, "1\tx7\t3\t881250950", 2, "item id 'x7' is not an integer"),
    ("u.data", 2, "2\t1\t4\tyesterday", 3, "timestamp 'yesterday' is not an integer"),
    ("u.data", 2, "2\t99\t4\t881250951", 3, "item 99 is not in u.item"),
    ("u.data", 2, "7\t1\t4\t881250951", 3, "user 7 is not in u.user"),
    ("u.item", 2, item_line(1), 3, "duplicate item id 1 (first on line 1)"),
    ("u.item", 0, "1|Toy Story (1995)|01-Jan-1995", 1, "expected 24 fields"),
    ("u.item", 1, item_line(2, flag="2"), 2, "genre flag '2' for Animation is not 0 or 1"),
    ("u.item", 0, item_line("one"), 1, "item id 'one' is not an integer"),
    ("u.user", 1, "2|old|F|other|94043", 2, "age 'old' is not an integer"),
    ("u.user", 1, "2|53|F|other", 2, "expected 5 fields"),
    ("u.user", 1, "1|30|F|other|1", 2, "duplicate user id 1 (first on line 1)"),
    ("u.genre", 2, "Adventure|5", 3, "genre indices must run 0, 1, 2"),
]


@pytest.mark.parametrize(("name", "index", "line", "line_no", "problem"), ML100K_BAD)
def test_ml100k_malformed(tmp_path, name, index, line, line_no, problem):
    root = write_files(tmp_path, with_line(ML100K, name, index, line))
    with pytest.raises(DataFormatError) as info:
        load_ml100k(root)
    assert_error(info.value, root / name, line_no, problem)


@pytest.mark.parametrize("name", ["u.data", "u.item", "u.user"])
def test_ml100k_missing_file(tmp_path, name):
    root = write_files(tmp_path, ML100K)
    (root / name).unlink()
    with pytest.raises(DataFormatError) as info:
        load_ml100k(root)
    assert_error(info.value, root / name, None, "file not found")


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_ml100k_empty_ratings(tmp_path, content):
    root = write_files(tmp_path, ML100K)
    (root / "u.data").write_bytes(content)
    with pytest.raises(DataFormatError) as info:
        load_ml100k(root)
    assert_error(info.value, root / "u.data", None, "file is empty")


def test_error_line_counts_blank_lines(tmp_path):
    root = write_files(tmp_path, ML100K)
    (root / "u.data").write_text("1\t1\t5\t1\n\n\n2\t1\tbad\t2\n")
    with pytest.raises(DataFormatError) as info:
        load_ml100k(root)
    assert_error(info.value, root / "u.data", 4, "rating 'bad' is not a number")


@pytest.mark.skipif(not REAL_ML100K.is_dir(), reason="MovieLens-100K not available locally")
def test_real_ml100k():
    ds = load_ml100k(REAL_ML100K)
    assert_schema(ds)
    assert len(ds.interactions) == 100_000
    assert ds.interactions["user"].nunique() == len(ds.users) == 943
    assert ds.interactions["item"].nunique() == len(ds.items) == 1682
    assert set(ds.interactions["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    first = ds.items.iloc[0]
    assert (first["item"], first["title"], first["year"]) == (1, "Toy Story", 1995)
    assert "Animation|Children's|Comedy" in first["genres"]
    assert not ds.items["genres"].str.contains("unknown").any()
    assert set(ds.users["age"]) <= {"under 18", "18-24", "25-34", "35-44", "45-49", "50-55",
                                    "56+"}


# ---------------------------------------------------------------- ML-1M


def test_ml1m_small_files(tmp_path):
    ds = load_ml1m(write_files(tmp_path, ML1M))
    assert_schema(ds)
    assert ds.name == "ml-1m" and len(ds.interactions) == 3
    items = ds.items.set_index("item")
    assert items.loc[661, "title"] == "Star Wars: Episode IV - A New Hope"
    assert items.loc[661, "year"] == 1977
    assert items.loc[661, "genres"] == "Action|Adventure|Fantasy|Sci-Fi"
    assert items.loc[3, "title"] == "Misérables, Les"  # latin-1 decoded
    assert ds.users.to_dict("records") == [
        {"user": 1, "gender": "female", "age": "under 18", "occupation": "K-12 student"},
        {"user": 2, "gender": "male", "age": "56+", "occupation": "self-employed"},
    ]


ML1M_BAD = [
    ("ratings.dat", 1, "1::661::3", 2, "expected 4 fields separated by '::', found 3"),
    ("ratings.dat", 1, "1::661:3::978302109", 2, "expected 4 fields"),
    ("ratings.dat", 2, "2::1193::five::978298413", 3, "rating 'five' is not a number"),
    ("ratings.dat", 2, "2::1193::9::978298413", 3, "rating '9' is outside 1..5"),
    ("ratings.dat", 0, "1::1193::4.5::978300760", 1, "rating '4.5' is not a whole number"),
    ("ratings.dat", 0, "u1::1193::5::978300760", 1, "user id 'u1' is not an integer"),
    ("ratings.dat", 2, "2::4242::4::978298413", 3, "item 4242 is not in movies.dat"),
    ("movies.dat", 2, "661::Duplicate (1990)::Drama", 3, "duplicate item id 661 (first on line 2)"),
    ("movies.dat", 0, "1193::Only a title (1975)", 1, "expected 3 fields"),
    ("users.dat", 1, "2::M::7::16::70072", 2, "age code '7' is not one of 1, 18, 25, 35"),
    ("users.dat", 1, "2::M::56::21::70072", 2, "occupation code '21' is not in 0..20"),
    ("users.dat", 0, "1::F::1::10", 1, "expected 5 fields"),
]


@pytest.mark.parametrize(("name", "index", "line", "line_no", "problem"), ML1M_BAD)
def test_ml1m_malformed(tmp_path, name, index, line, line_no, problem):
    root = write_files(tmp_path, with_line(ML1M, name, index, line))
    with pytest.raises(DataFormatError) as info:
        load_ml1m(root)
    assert_error(info.value, root / name, line_no, problem)


@pytest.mark.parametrize("name", ["ratings.dat", "movies.dat", "users.dat"])
def test_ml1m_missing_file(tmp_path, name):
    root = write_files(tmp_path, ML1M)
    (root / name).unlink()
    with pytest.raises(DataFormatError) as info:
        load_ml1m(root)
    assert_error(info.value, root / name, None, "file not found")


def test_ml1m_empty_ratings(tmp_path):
    root = write_files(tmp_path, ML1M)
    (root / "ratings.dat").write_bytes(b"")
    with pytest.raises(DataFormatError) as info:
        load_ml1m(root)
    assert_error(info.value, root / "ratings.dat", None, "file is empty")


# ---------------------------------------------------------------- registry


def test_load_dataset_dispatches(tmp_path):
    root = write_files(tmp_path, ML100K)
    assert load_dataset("ml-100k", directory=root).name == "ml-100k"
    assert load_dataset("ml-1m", directory=write_files(tmp_path / "m", ML1M)).name == "ml-1m"
    with pytest.raises(ValueError, match="unknown dataset kind 'ml-20m'.*ml-100k"):
        load_dataset("ml-20m", directory=root)
