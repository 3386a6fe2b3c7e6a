"""Loaders for the GroupLens MovieLens-100K and MovieLens-1M distributions.

Both keep raw ids and turn coded profile fields (age, occupation, gender) into readable
strings, because the prompts shown to the language model are built from these values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from training.data.csv_format import (
    PathArg,
    Table,
    check_rating_range,
    normalise_genres,
    read_table,
    split_title_year,
)
from training.data.schema import RawDataset

ENCODING = "latin-1"
RATING_MIN, RATING_MAX = 1.0, 5.0

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
# ML-1M README: age is coded by the lower bound of its bucket.
ML1M_AGES = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
             56: "56+"}
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)
GENDERS = {"M": "male", "F": "female"}
# ML-100K ages are exact; bucket them like ML-1M so both datasets read the same in prompts.
_AGE_BINS = [-np.inf, 17, 24, 34, 44, 49, 55, np.inf]


def load_ml100k(directory: PathArg) -> RawDataset:
    """Read u.data, u.item (+ u.genre when present) and u.user from an ml-100k folder."""
    root = Path(directory)
    items = _ml100k_items(root / "u.item", _ml100k_genre_names(root / "u.genre"))
    users = _ml100k_users(root / "u.user")
    interactions = _ratings(root / "u.data", "\t", items, root / "u.item", users, root / "u.user")
    return RawDataset("ml-100k", interactions, items, users, RATING_MIN, RATING_MAX)


def load_ml1m(directory: PathArg) -> RawDataset:
    """Read ratings.dat, movies.dat and users.dat ("::"-separated) from an ml-1m folder."""
    root = Path(directory)
    items = _ml1m_items(root / "movies.dat")
    users = _ml1m_users(root / "users.dat")
    interactions = _ratings(root / "ratings.dat", "::", items, root / "movies.dat",
                            users, root / "users.dat")
    return RawDataset("ml-1m", interactions, items, users, RATING_MIN, RATING_MAX)


def _ratings(path: Path, sep: str, items: pd.DataFrame, items_path: Path,
             users: pd.DataFrame, users_path: Path) -> pd.DataFrame:
    table = read_table(path, sep=sep, encoding=ENCODING, header=False, n_fields=4, quoting=False)
    interactions = pd.DataFrame({
        "user": table.integers(0, "user id"),
        "item": table.integers(1, "item id"),
        "rating": table.numbers(2, "rating"),
        "timestamp": table.integers(3, "timestamp"),
    })
    check_rating_range(table, 2, interactions["rating"], RATING_MIN, RATING_MAX, whole=True)
    table.known_ids(interactions["item"], items["item"], "item", items_path)
    table.known_ids(interactions["user"], users["user"], "user", users_path)
    return interactions


def _ml100k_genre_names(path: Path) -> list[str]:
    if not path.is_file():
        return list(ML100K_GENRES)
    table = read_table(path, sep="|", encoding=ENCODING, header=False, n_fields=2, quoting=False)
    index = table.integers(1, "genre index")
    table.check(index.to_numpy() == np.arange(len(index)),
                "genre indices must run 0, 1, 2, ... in file order")
    return table.frame[0].str.strip().tolist()


def _ml100k_items(path: Path, genre_names: list[str]) -> pd.DataFrame:
    n_genres = len(genre_names)
    table = read_table(path, sep="|", encoding=ENCODING, header=False, n_fields=5 + n_genres,
                       quoting=False)
    ids = table.integers(0, "item id")
    table.unique_ids(ids, "item")

    flags = table.frame.iloc[:, 5:].apply(lambda column: column.str.strip())
    valid = flags.isin(["0", "1"]).to_numpy()
    if not valid.all():
        row, col = (int(v[0]) for v in np.nonzero(~valid))
        table.fail(row, f"genre flag {flags.iat[row, col]!r} for {genre_names[col]} is not 0 or 1")
    # "unknown" only marks a missing genre, so it never appears in the genre text.
    shown = np.array([name.lower() != "unknown" for name in genre_names])
    names = np.array(genre_names, dtype=object)
    genres = [
        "|".join(names[row & shown]) for row in flags.to_numpy() == "1"
    ]

    titles, years = split_title_year(table.frame[1])
    release_year = table.frame[2].str.extract(r"(\d{4})\s*$")[0]
    years = years.fillna(pd.to_numeric(release_year).astype("Int64"))
    return pd.DataFrame({"item": ids, "title": titles,
                         "genres": pd.Series(genres, index=ids.index, dtype=str), "year": years})


def _ml100k_users(path: Path) -> pd.DataFrame:
    table = read_table(path, sep="|", encoding=ENCODING, header=False, n_fields=5, quoting=False)
    ids = table.integers(0, "user id")
    table.unique_ids(ids, "user")
    ages = table.integers(1, "age")
    table.check_values(ages.between(1, 120), 1, "age", "is not a plausible age")
    age = pd.cut(ages, bins=_AGE_BINS, labels=list(ML1M_AGES.values())).astype(str)
    return pd.DataFrame({"user": ids, "gender": _gender(table, 2), "age": age,
                         "occupation": table.frame[3].str.strip()})


def _ml1m_items(path: Path) -> pd.DataFrame:
    table = read_table(path, sep="::", encoding=ENCODING, header=False, n_fields=3)
    ids = table.integers(0, "item id")
    table.unique_ids(ids, "item")
    titles, years = split_title_year(table.frame[1])
    return pd.DataFrame({"item": ids, "title": titles,
                         "genres": normalise_genres(table.frame[2], "|"), "year": years})


def _ml1m_users(path: Path) -> pd.DataFrame:
    table = read_table(path, sep="::", encoding=ENCODING, header=False, n_fields=5)
    ids = table.integers(0, "user id")
    table.unique_ids(ids, "user")
    ages = table.integers(2, "age code")
    table.check_values(ages.isin(list(ML1M_AGES)), 2, "age code",
                       f"is not one of {', '.join(map(str, ML1M_AGES))}")
    jobs = table.integers(3, "occupation code")
    table.check_values(jobs.between(0, len(ML1M_OCCUPATIONS) - 1), 3, "occupation code",
                       f"is not in 0..{len(ML1M_OCCUPATIONS) - 1}")
    return pd.DataFrame({
        "user": ids,
        "gender": _gender(table, 1),
        "age": ages.map(ML1M_AGES).astype(str),
        "occupation": jobs.map(dict(enumerate(ML1M_OCCUPATIONS))).astype(str),
    })


def _gender(table: Table, column: int) -> pd.Series:
    raw = table.frame[column].str.strip()
    return raw.map(GENDERS).fillna(raw).astype(str)
