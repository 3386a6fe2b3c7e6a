from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd
import pytest

from training.data.csv_format import load_csv_dataset
from training.data.errors import DataFormatError
from training.data.loaders import load_dataset

# MovieLens "latest" layout: half-star ratings, quoted titles, "(no genres listed)".
RATINGS = [
    "userId,movieId,rating,timestamp",
    "1,1,4.0,964982703",
    "1,3,0.5,964981247",
    "2,11,3.5,964982224",
    "2,1,5,964983815",
]
MOVIES = [
    "movieId,title,genres",
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
    '3,"American President, The (1995)",Comedy|Drama|Romance',
    "11,Untitled Short,(no genres listed)",
]
LATEST = dict(user_col="userId", item_col="movieId", item_id_col="movieId", rating_min=0.5)


def write(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def replaced(lines: list[str], index: int, line: str) -> list[str]:
    return [line if i == index else old for i, old in enumerate(lines)]


def assert_error(err: DataFormatError, path: Path, line: int | None, problem: str) -> None:
    assert err.path == path and err.line == line
    where = f"{path}" if line is None else f"{path} line {line}"
    assert str(err).startswith(f"{where}: "), str(err)
    assert problem in err.problem, str(err)


def test_movielens_latest_layout(tmp_path):
    ds = load_csv_dataset(write(tmp_path / "ratings.csv", RATINGS),
                          write(tmp_path / "movies.csv", MOVIES), name="ml-latest-small", **LATEST)
    assert ds.name == "ml-latest-small" and (ds.rating_min, ds.rating_max) == (0.5, 5.0)
    assert ds.interactions.to_dict("list") == {
        "user": [1, 1, 2, 2], "item": [1, 3, 11, 1], "rating": [4.0, 0.5, 3.5, 5.0],
        "timestamp": [964982703, 964981247, 964982224, 964983815],
    }
    assert [str(t) for t in ds.interactions.dtypes] == ["int64", "int64", "float64", "int64"]
    assert ds.items["title"].tolist() == ["Toy Story", "American President, The",
                                          "Untitled Short"]
    assert ds.items["year"].tolist()[:2] == [1995, 1995] and pd.isna(ds.items["year"].iloc[2])
    assert str(ds.items["year"].dtype) == "Int64"
    assert ds.items["genres"].tolist()[2] == ""
    assert ds.items["genres"].tolist()[0] == "Adventure|Animation|Children|Comedy|Fantasy"
    assert ds.users.to_dict("list") == {"user": [1, 2]}


def test_ml_latest_kind_reads_a_directory(tmp_path):
    write(tmp_path / "ratings.csv", RATINGS)
    write(tmp_path / "movies.csv", MOVIES)
    ds = load_dataset("ml-latest", directory=tmp_path)
    assert len(ds.interactions) == 4 and ds.rating_min == 0.5


def test_ml_latest_drops_ratings_of_unknown_movies_only_when_asked(tmp_path):
    """The refusal's advice (--drop-unknown-items) holds for the ml-latest format too."""
    write(tmp_path / "ratings.csv", RATINGS + ["2,99,4.0,964983900"])
    write(tmp_path / "movies.csv", MOVIES)
    with pytest.raises(DataFormatError, match="--drop-unknown-items"):
        load_dataset("ml-latest", directory=tmp_path)
    ds = load_dataset("ml-latest", directory=tmp_path, drop_unknown_items=True)
    assert len(ds.interactions) == 4 and ds.dropped_rows == {"unknown_item": 1}


def test_custom_columns_separator_year_extras_and_users(tmp_path):
    inter = write(tmp_path / "events.tsv", ["who;what;stars;when", "10;7;2;100", "11;7;9;200"],
                  encoding="latin-1")
    items = write(tmp_path / "catalog.tsv", ["id;name;tags;released;blurb;item",
                                             "7;Amélie (2001);Comedy, Romance;2001;Paris;x"],
                  encoding="latin-1")
    users = write(tmp_path / "people.tsv", ["who;gender;country", "10;F;FR", "11;M; DE "])
    ds = load_dataset(
        "csv", interactions_path=inter, items_path=items, users_path=users, sep=";",
        encoding="latin-1", user_col="who", item_col="what", rating_col="stars",
        timestamp_col="when", item_id_col="id", title_col="name", genres_col="tags",
        year_col="released", genre_sep=",", rating_min=1, rating_max=10,
    )
    item = ds.items.iloc[0]
    # With an explicit year column the title is left untouched.
    assert item["title"] == "Amélie (2001)"
    assert (item["genres"], item["year"]) == ("Comedy|Romance", 2001)
    assert item["blurb"] == "Paris" and list(ds.items.columns) == ["item", "title", "genres",
                                                                   "year", "blurb"]
    assert ds.users.to_dict("records") == [{"user": 10, "gender": "F", "country": "FR"},
                                           {"user": 11, "gender": "M", "country": "DE"}]
    assert ds.rating_max == 10.0


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    ratings = tmp_path / "ratings.csv"
    ratings.write_bytes(b"\xef\xbb\xbf" + ("\n".join(RATINGS) + "\n").encode())
    ds = load_csv_dataset(ratings, write(tmp_path / "movies.csv", MOVIES), **LATEST)
    assert len(ds.interactions) == 4


RATINGS_BAD = [
    (0, "userId,movieId,score,timestamp", 1,
     "missing column 'rating' (found: userId, movieId, score, timestamp)"),
    (2, "1,3,0.5", 3, "expected 4 fields separated by ',', found 3"),
    (2, "1,3,0.5,964981247,extra", 3, "expected 4 fields"),
    (3, "2,11,abc,964982224", 4, "rating 'abc' is not a number"),
    (3, "2,11,nan,964982224", 4, "rating 'nan' is not a number"),
    (3, "2,11,inf,964982224", 4, "rating 'inf' is not a finite number"),
    (3, "2,11,,964982224", 4, "rating is missing"),
    (1, "1,1,5.5,964982703", 2, "rating '5.5' is outside 0.5..5"),
    (1, "1,1,0,964982703", 2, "rating '0' is outside 0.5..5"),
    (4, "two,1,5,964983815", 5, "user id 'two' is not an integer"),
    (4, "2,1.0,5,964983815", 5, "item id '1.0' is not an integer"),
    (4, "2,1,5,2020-01-01", 5, "timestamp '2020-01-01' is not an integer"),
    (2, "1,999,0.5,964981247", 3, "item 999 is not in movies.csv"),
    (2, '1,3,"0.5,964981247', 3, "malformed quoting"),
]


@pytest.mark.parametrize(("index", "line", "line_no", "problem"), RATINGS_BAD)
def test_malformed_ratings(tmp_path, index, line, line_no, problem):
    ratings = write(tmp_path / "ratings.csv", replaced(RATINGS, index, line))
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(ratings, write(tmp_path / "movies.csv", MOVIES), **LATEST)
    assert_error(info.value, ratings, line_no, problem)


MOVIES_BAD = [
    (0, "movieId,name,genres", 1, "missing column 'title' (found: movieId, name, genres)"),
    (2, "3,American President, The (1995),Comedy", 3, "expected 3 fields separated by ','"),
    (3, "1,Again (1999),Drama", 4, "duplicate item id 1 (first on line 2)"),
    (1, "one,Toy Story (1995),Comedy", 2, "item id 'one' is not an integer"),
    (0, "movieId,title,genres,genres", 1, "duplicate column 'genres' in header"),
]


@pytest.mark.parametrize(("index", "line", "line_no", "problem"), MOVIES_BAD)
def test_malformed_movies(tmp_path, index, line, line_no, problem):
    movies = write(tmp_path / "movies.csv", replaced(MOVIES, index, line))
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(write(tmp_path / "ratings.csv", RATINGS), movies, **LATEST)
    assert_error(info.value, movies, line_no, problem)


def test_invalid_utf8_names_the_line(tmp_path):
    movies = tmp_path / "movies.csv"
    movies.write_bytes(("\n".join(MOVIES[:3]) + "\n").encode() + b"11,Am\xe9lie (2001),Comedy\n")
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(write(tmp_path / "ratings.csv", RATINGS), movies, **LATEST)
    assert_error(info.value, movies, 4, "byte 0xe9 is not valid utf-8 text")


def test_bad_year_column(tmp_path):
    movies = write(tmp_path / "movies.csv", ["movieId,title,genres,year", "1,A,Drama,1995",
                                             "3,B,Drama,", "11,C,Drama,about 1990"])
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(write(tmp_path / "ratings.csv", RATINGS), movies, year_col="year",
                         **LATEST)
    assert_error(info.value, movies, 4, "year 'about 1990' is not an integer")


def test_users_file_must_cover_interactions(tmp_path):
    users = write(tmp_path / "users.csv", ["userId,gender", "1,F"])
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(write(tmp_path / "ratings.csv", RATINGS),
                         write(tmp_path / "movies.csv", MOVIES), users_path=users, **LATEST)
    assert_error(info.value, tmp_path / "ratings.csv", 4, "user 2 is not in users.csv")


@pytest.mark.parametrize("which", ["ratings.csv", "movies.csv", "users.csv"])
def test_missing_file(tmp_path, which):
    files = {name: tmp_path / name for name in ("ratings.csv", "movies.csv", "users.csv")}
    write(files["ratings.csv"], RATINGS)
    write(files["movies.csv"], MOVIES)
    write(files["users.csv"], ["userId,gender", "1,F", "2,M"])
    files[which].unlink()
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(files["ratings.csv"], files["movies.csv"],
                         users_path=files["users.csv"], **LATEST)
    assert_error(info.value, files[which], None, "file not found")


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "file is empty (expected a header line)"),
    (b"userId,movieId,rating,timestamp\n", "file is empty (no data rows)"),
])
def test_empty_file(tmp_path, content, problem):
    ratings = tmp_path / "ratings.csv"
    ratings.write_bytes(content)
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(ratings, write(tmp_path / "movies.csv", MOVIES), **LATEST)
    assert_error(info.value, ratings, None, problem)


def test_rating_bounds_must_be_ordered(tmp_path):
    with pytest.raises(ValueError, match="rating_min"):
        load_csv_dataset(tmp_path / "r.csv", tmp_path / "m.csv", rating_min=5, rating_max=1)


def test_error_survives_pickling():
    err = pickle.loads(pickle.dumps(DataFormatError("u.data", 17, "rating 'x' is not a number")))
    assert isinstance(err, ValueError)
    assert (err.path, err.line) == ("u.data", 17)
    assert str(err) == "u.data line 17: rating 'x' is not a number"


def test_lines_count_quoted_newlines_and_blank_lines(tmp_path):
    movies = write(tmp_path / "movies.csv", [
        "movieId,title,genres",
        '1,"A title that',
        'spans two lines (1999)",Drama',
        "",
        "   ",
        "x3,Broken (2000),Drama",
    ])
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(write(tmp_path / "ratings.csv", RATINGS), movies, **LATEST)
    assert_error(info.value, movies, 6, "item id 'x3' is not an integer")


def test_signed_and_padded_numbers_are_accepted(tmp_path):
    ratings = write(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp",
                                               "+1, 1 , 4.5 ,964982703", "2,3,1e0,-5"])
    ds = load_csv_dataset(ratings, write(tmp_path / "movies.csv", MOVIES), **LATEST)
    assert ds.interactions.to_dict("list") == {"user": [1, 2], "item": [1, 3],
                                               "rating": [4.5, 1.0], "timestamp": [964982703, -5]}


def test_missing_column_names_the_header_line_after_blank_lines(tmp_path):
    ratings = write(tmp_path / "ratings.csv", ["", "userId,item,rating,timestamp", "1,1,4,5"])
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(ratings, write(tmp_path / "movies.csv", MOVIES), **LATEST)
    assert_error(info.value, ratings, 2, "missing column 'movieId'")


# ---- column defaults, items without genres, unknown items, inferred rating range -------------------

BOOK_RATINGS = ["user_id,book_id,rating,timestamp", "1,10,4.5,100", "1,20,1.5,200", "2,10,3,300",
                "2,99,2,400", "3,20,5,500", "3,98,0.5,600"]
BOOKS = ["book_id,title,author", "10,Middlemarch (1871),Eliot", "20,Beloved (1987),Morrison"]
BOOK_COLUMNS = dict(user_col="user_id", item_col="book_id", genres_col="")


def test_items_id_column_defaults_to_the_ratings_item_column(tmp_path):
    books = write(tmp_path / "books.csv", BOOKS)
    ratings = write(tmp_path / "ratings.csv", [line for line in BOOK_RATINGS if ",9" not in line])
    ds = load_csv_dataset(ratings, books, **BOOK_COLUMNS)
    assert ds.items["item"].tolist() == [10, 20] and ds.interactions["item"].tolist() == [10, 20, 10, 20]
    # an explicit --item-id-col still names another column
    other = write(tmp_path / "other.csv", ["id,title", "10,A", "20,B"])
    assert load_csv_dataset(ratings, other, item_id_col="id", **BOOK_COLUMNS).items["title"].tolist() == ["A", "B"]


@pytest.mark.parametrize("genres_col", ["", None])
def test_items_without_genres_load_with_empty_genres(tmp_path, genres_col):
    ratings = write(tmp_path / "ratings.csv", [line for line in BOOK_RATINGS if ",9" not in line])
    ds = load_csv_dataset(ratings, write(tmp_path / "books.csv", BOOKS), user_col="user_id",
                          item_col="book_id", genres_col=genres_col)
    assert ds.items["genres"].tolist() == ["", ""]
    assert ds.items["title"].tolist() == ["Middlemarch", "Beloved"] and ds.items["year"].tolist() == [1871, 1987]
    assert ds.items["author"].tolist() == ["Eliot", "Morrison"]  # kept as an extra text column


def test_a_missing_genres_column_names_the_way_out(tmp_path):
    books = write(tmp_path / "books.csv", BOOKS)
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(write(tmp_path / "ratings.csv", BOOK_RATINGS), books, user_col="user_id",
                         item_col="book_id")
    assert_error(info.value, books, 1, "missing column 'genres' (found: book_id, title, author)")
    assert "--genres-col ''" in info.value.problem


def test_unknown_items_are_refused_by_default_with_the_flag_named(tmp_path):
    ratings = write(tmp_path / "ratings.csv", BOOK_RATINGS)
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(ratings, write(tmp_path / "books.csv", BOOKS), **BOOK_COLUMNS)
    assert_error(info.value, ratings, 5, "item 99 is not in books.csv")
    assert "--drop-unknown-items" in info.value.problem


def test_drop_unknown_items_leaves_them_out_and_counts_them(tmp_path):
    ds = load_csv_dataset(write(tmp_path / "ratings.csv", BOOK_RATINGS), write(tmp_path / "books.csv", BOOKS),
                          drop_unknown_items=True, **BOOK_COLUMNS)
    assert ds.dropped_rows == {"unknown_item": 2}
    assert ds.interactions.to_dict("list") == {"user": [1, 1, 2, 3], "item": [10, 20, 10, 20],
                                               "rating": [4.5, 1.5, 3.0, 5.0], "timestamp": [100, 200, 300, 500]}
    assert ds.interactions.index.tolist() == [0, 1, 2, 3]


def test_after_dropping_a_users_file_error_still_names_the_right_line(tmp_path):
    ratings = write(tmp_path / "ratings.csv", BOOK_RATINGS)
    users = write(tmp_path / "users.csv", ["user_id,country", "1,FR", "2,DE"])
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(ratings, write(tmp_path / "books.csv", BOOKS), users_path=users,
                         drop_unknown_items=True, **BOOK_COLUMNS)
    assert_error(info.value, ratings, 6, "user 3 is not in users.csv")


def test_dropping_every_rating_is_refused(tmp_path):
    ratings = write(tmp_path / "ratings.csv", ["user_id,book_id,rating,timestamp", "1,99,4,1"])
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(ratings, write(tmp_path / "books.csv", BOOKS), drop_unknown_items=True, **BOOK_COLUMNS)
    assert_error(info.value, ratings, None, "no rating names an item of books.csv")


def test_rating_range_is_inferred_where_not_stated(tmp_path):
    ratings, movies = write(tmp_path / "ratings.csv", RATINGS), write(tmp_path / "movies.csv", MOVIES)
    columns = dict(user_col="userId", item_col="movieId")
    ds = load_csv_dataset(ratings, movies, rating_min=None, rating_max=None, **columns)
    assert (ds.rating_min, ds.rating_max) == (0.5, 5.0)  # MovieLens "latest" needs no flags
    ds = load_csv_dataset(ratings, movies, rating_min=0.0, rating_max=None, **columns)
    assert (ds.rating_min, ds.rating_max) == (0.0, 5.0)
    ds = load_csv_dataset(ratings, movies, rating_min=None, rating_max=10, **columns)
    assert (ds.rating_min, ds.rating_max) == (0.5, 10.0)


@pytest.mark.parametrize(("bounds", "line_no", "problem"), [
    (dict(rating_min=1.0, rating_max=None), 3, "rating '0.5' is outside 1..5"),
    (dict(rating_min=None, rating_max=4.5), 5, "rating '5' is outside 0.5..4.5"),
    (dict(rating_min=6.0, rating_max=None), 2, "rating '4.0' is below the stated minimum rating 6"),
    (dict(rating_min=None, rating_max=0.25), 2, "rating '4.0' is above the stated maximum rating 0.25"),
])
def test_a_stated_bound_is_checked_against_every_rating(tmp_path, bounds, line_no, problem):
    ratings = write(tmp_path / "ratings.csv", RATINGS)
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(ratings, write(tmp_path / "movies.csv", MOVIES), user_col="userId", item_col="movieId",
                         **bounds)
    assert_error(info.value, ratings, line_no, problem)


@pytest.mark.parametrize(("which", "index", "line", "line_no", "problem"), [
    ("ratings", 2, "1,3,0.5,964981247.0", 3, "timestamp '964981247.0' is not an integer"),
    ("ratings", 2, "1,3,0.5,1e9", 3, "timestamp '1e9' is not an integer"),
    ("ratings", 3, "u2,11,3.5,964982224", 4, "user id 'u2' is not an integer"),
    ("ratings", 3, "2,B011,3.5,964982224", 4, "item id 'B011' is not an integer"),
    ("movies", 3, "11.5,Untitled Short,(no genres listed)", 4, "item id '11.5' is not an integer"),
])
def test_ids_and_timestamps_must_be_integers(tmp_path, which, index, line, line_no, problem):
    lines = {"ratings": RATINGS, "movies": MOVIES}
    files = {name: write(tmp_path / f"{name}.csv", replaced(content, index, line) if name == which else content)
             for name, content in lines.items()}
    with pytest.raises(DataFormatError) as info:
        load_csv_dataset(files["ratings"], files["movies"], **LATEST)
    assert_error(info.value, files[which], line_no, problem)


def test_item_words_are_recorded_and_checked(tmp_path):
    ratings = write(tmp_path / "ratings.csv", [line for line in BOOK_RATINGS if ",9" not in line])
    books = write(tmp_path / "books.csv", BOOKS)
    ds = load_csv_dataset(ratings, books, item_noun="book", **BOOK_COLUMNS)
    assert (ds.words.noun, ds.words.plural, ds.words.verb) == ("book", "books", "read")
    default = load_csv_dataset(ratings, books, **BOOK_COLUMNS).words
    assert (default.noun, default.plural, default.verb) == ("movie", "movies", "watched")
    odd = load_csv_dataset(ratings, books, item_noun="series", item_plural="series", **BOOK_COLUMNS).words
    assert (odd.plural, odd.verb) == ("series", "watched")
    assert load_csv_dataset(ratings, books, item_noun="gadget", **BOOK_COLUMNS).words.verb == "interacted with"
    for bad in ("", " book", "two\nlines", "***"):
        with pytest.raises(ValueError, match="item noun"):
            load_csv_dataset(ratings, books, item_noun=bad, **BOOK_COLUMNS)
