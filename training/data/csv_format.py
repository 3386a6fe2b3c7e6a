"""Delimited-text tables with line-aware validation, and the generic CSV dataset loader.

Clean files are parsed by pandas' C reader and checked with vectorised column operations; a
row-by-row reader takes over only where pandas cannot vouch for exact line numbers and field
counts (quoted fields, blank lines, ragged rows). Either way a malformed file yields
"<file> line N: <problem>". The MovieLens loaders reuse ``read_table`` and these checks.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from training.data.errors import DataFormatError
from training.data.schema import ItemWords, RawDataset

PathArg = str | PathLike[str]

NO_GENRES = "(no genres listed)"
# Multi-character separators (MovieLens "::") are mapped to this control character before
# tokenising, so single-character readers split them without regex-separator surprises.
_UNIT_SEP = "\x1f"
_INT_PATTERN = r"[+-]?\d{1,18}"
_TITLE_YEAR_PATTERN = r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$"


@dataclass(frozen=True)
class Table:
    """A delimited file's rows as strings, plus each row's first line number for messages."""

    path: PathArg
    frame: pd.DataFrame
    lines: np.ndarray
    header_line: int | None = None

    def fail(self, row: int, problem: str) -> NoReturn:
        raise DataFormatError(self.path, int(self.lines[row]), problem)

    def check(self, ok: pd.Series | np.ndarray, problem: str) -> None:
        """Raise ``problem`` for the first row where ``ok`` is False."""
        bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
        if bad.size:
            self.fail(int(bad[0]), problem)

    def check_values(self, ok: pd.Series | np.ndarray, column, what: str, reason: str) -> None:
        """Like ``check``, quoting the offending raw value: "rating 'x' is not a number"."""
        bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
        if bad.size:
            row = int(bad[0])
            self.fail(row, describe_value(what, self.frame[column].iloc[row], reason))

    def require_columns(self, columns: list[str]) -> None:
        """Missing columns name themselves and list what the header does have."""
        found = list(self.frame.columns)
        for column in columns:
            if column not in found:
                raise DataFormatError(self.path, self.header_line,
                                      f"missing column {column!r} (found: {', '.join(found)})")

    def integers(self, column, what: str) -> pd.Series:
        values = self.frame[column].str.strip()
        self.check_values(values.str.fullmatch(_INT_PATTERN), column, what, "is not an integer")
        return _cast(values, "int64")

    def optional_integers(self, column, what: str) -> pd.Series:
        """Nullable integers: empty cells become <NA>."""
        values = self.frame[column].str.strip()
        ok = values.eq("") | values.str.fullmatch(_INT_PATTERN)
        self.check_values(ok, column, what, "is not an integer")
        return pd.to_numeric(values.mask(values.eq(""))).astype("Int64")

    def numbers(self, column, what: str) -> pd.Series:
        raw = self.frame[column].str.strip()
        try:
            values = _cast(raw, "float64")
        except ValueError:  # only malformed files get here: coerce to find the bad row
            values = pd.to_numeric(raw, errors="coerce").astype("float64")
        self.check_values(values.notna(), column, what, "is not a number")
        self.check_values(np.isfinite(values), column, what, "is not a finite number")
        return values

    def unique_ids(self, ids: pd.Series, what: str) -> None:
        dup = ids.duplicated()
        if dup.any():
            row = int(np.flatnonzero(dup.to_numpy())[0])
            first = int(np.flatnonzero((ids == ids.iloc[row]).to_numpy())[0])
            first_line = self.lines[first]
            self.fail(row, f"duplicate {what} id {ids.iloc[row]} (first on line {first_line})")

    def known_ids(self, ids: pd.Series, known: pd.Series, what: str, source: PathArg,
                  hint: str = "") -> None:
        """Every id in this file must appear in ``source`` (e.g. ratings -> item file).

        ``ids`` keeps the table's row labels (0..n-1), also when it is a subset of the rows, so the
        message names the right line; ``hint`` is appended to it.
        """
        ok = ids.isin(known).to_numpy()
        if not ok.all():
            position = int(np.flatnonzero(~ok)[0])
            self.fail(int(ids.index[position]),
                      f"{what} {ids.iloc[position]} is not in {Path(source).name}{hint}")


def _cast(values: pd.Series, dtype: str) -> pd.Series:
    """String-to-number conversion via Arrow's vectorised cast (about 10x faster than
    Python's), falling back to pandas for forms Arrow rejects, such as "+5"."""
    try:
        return values.astype(f"{dtype}[pyarrow]").astype(dtype)
    except (ValueError, TypeError, ImportError):
        return values.astype(dtype)


def describe_value(what: str, value: str, reason: str) -> str:
    if not str(value).strip():
        return f"{what} is missing"
    return f"{what} {value!r} {reason}"


def decode(raw: bytes, encoding: str, path: PathArg) -> str:
    """Decode, naming the line of the first undecodable byte rather than a byte offset."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFormatError(
            path, line, f"byte 0x{raw[err.start]:02x} is not valid {encoding} text"
        ) from None
    return text.removeprefix("\ufeff")


def read_table(path: PathArg, *, sep: str, encoding: str, header: bool,
               n_fields: int | None = None, quoting: bool = True) -> Table:
    """Tokenise a delimited file into string columns, checking every row's field count.

    With ``header`` the first row names the columns and data rows start at line 2; otherwise
    columns are numbered 0..n_fields-1. Blank lines are skipped. Multi-character separators
    imply no quoting, as in the MovieLens ``.dat`` files.
    """
    file = Path(path)
    if not file.is_file():
        raise DataFormatError(path, None, "file not found")
    text = decode(file.read_bytes(), encoding, path)
    delimiter = sep
    if len(sep) != 1:
        text, delimiter, quoting = text.replace(sep, _UNIT_SEP), _UNIT_SEP, False

    quoted = quoting and '"' in text
    frame = None if quoted else _fast_rows(text, delimiter)
    if frame is not None:
        rows: list[list[str]] = []
        lines = np.arange(1, len(frame) + 1, dtype=np.int64)
        lengths = np.full(len(frame), frame.shape[1], dtype=np.int64)
    else:
        rows, lines, lengths = _exact_rows(path, text, delimiter, quoted)
    if lines.size == 0:
        expectation = "expected a header line" if header else "no data rows"
        raise DataFormatError(path, None, f"file is empty ({expectation})")

    names: list[str] = []
    if header:
        names = [name.strip() for name in (rows[0] if frame is None else frame.iloc[0])]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise DataFormatError(path, int(lines[0]), f"duplicate column {name!r} in header")
    expected = int(lengths[0]) if header or n_fields is None else n_fields
    bad = np.flatnonzero(lengths != expected)
    if bad.size:
        row = int(bad[0])
        raise DataFormatError(
            path, int(lines[row]),
            f"expected {expected} fields separated by {sep!r}, found {lengths[row]}",
        )
    if frame is None:
        frame = pd.DataFrame(rows, dtype=str)
    if not header:
        return Table(path, frame, lines)
    frame = frame.iloc[1:].reset_index(drop=True)
    frame.columns = names
    if frame.empty:
        raise DataFormatError(path, None, "file is empty (no data rows)")
    return Table(path, frame, lines[1:], header_line=int(lines[0]))


def _fast_rows(text: str, delimiter: str) -> pd.DataFrame | None:
    """Parse unquoted text with pandas' C reader, or return None when pandas cannot vouch for
    an exact row-per-line reading with equal field counts (the exact reader then decides)."""
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter, header=None, dtype=str,
                            na_filter=False, quoting=csv.QUOTE_NONE, engine="c")
    except pd.errors.EmptyDataError:
        return None
    except pd.errors.ParserError:  # some row has more fields than the first
        return None
    n_lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    # pandas pads short rows silently: equal delimiter totals prove none was short, and one row
    # per physical line proves no blank line was skipped, so row i is line i + 1.
    if len(frame) != n_lines or text.count(delimiter) != (frame.shape[1] - 1) * len(frame):
        return None
    return frame


def _exact_rows(path: PathArg, text: str, delimiter: str,
                quoted: bool) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Row-by-row reading that records each row's first line and field count."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for row in reader:
            if len(row) > 1 or (row and row[0].strip()):
                rows.append(row)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataFormatError(path, start, f"malformed quoting ({err})") from None
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return rows, np.asarray(lines, dtype=np.int64), lengths


def split_title_year(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Split "Heat (1995)" into ("Heat", 1995); titles without a trailing year keep <NA>."""
    titles = titles.str.strip()
    parts = titles.str.extract(_TITLE_YEAR_PATTERN)
    has_year = parts["year"].notna() & parts["title"].ne("")
    clean = titles.where(~has_year, parts["title"])
    year = pd.to_numeric(parts["year"].where(has_year)).astype("Int64")
    return clean, year


def normalise_genres(genres: pd.Series, sep: str) -> pd.Series:
    """Re-join genres with '|', dropping blanks and the "(no genres listed)" placeholder."""
    def join(value: str) -> str:
        kept = (g.strip() for g in value.split(sep))
        return "|".join(g for g in kept if g and g != NO_GENRES)

    return genres.fillna("").map(join).astype(str)


def check_rating_range(table: Table, column, ratings: pd.Series, low: float, high: float,
                       *, whole: bool = False) -> None:
    table.check_values(ratings.between(low, high), column, "rating",
                       f"is outside {low:g}..{high:g}")
    if whole:
        table.check_values(ratings.eq(ratings.round()), column, "rating", "is not a whole number")


def load_csv_dataset(
    interactions_path: PathArg,
    items_path: PathArg,
    *,
    users_path: PathArg | None = None,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    timestamp_col: str = "timestamp",
    item_id_col: str | None = None,
    title_col: str = "title",
    genres_col: str | None = "genres",
    year_col: str | None = None,
    genre_sep: str = "|",
    sep: str = ",",
    encoding: str = "utf-8",
    rating_min: float | None = 0.0,
    rating_max: float | None = 5.0,
    drop_unknown_items: bool = False,
    item_noun: str = "movie",
    item_plural: str | None = None,
    item_verb: str | None = None,
    name: str = "csv",
) -> RawDataset:
    """Load any ratings + items (+ users) CSV trio whose column names are given by flags.

    Covers MovieLens "latest" (userId, movieId, rating, timestamp / movieId, title, genres)
    without a dedicated loader. ``item_id_col`` (the items file's id column) defaults to
    ``item_col``. Without ``year_col`` the year comes from a trailing "(YYYY)" in the title, which
    is then stripped; ``genres_col`` None or "" means the items have no genres. Other item columns
    are kept as extra text columns (except ones named like the schema columns
    item/title/genres/year); other user columns become categorical profile columns. Ids and
    timestamps (seconds) must be integers. A rating bound of None is the lowest / highest rating
    in the file (``reclora prepare`` infers both unless told). A rating naming an item the items
    file lacks is refused, or with ``drop_unknown_items`` left out and counted in
    ``dropped_rows["unknown_item"]``.
    ``item_noun`` / ``item_plural`` / ``item_verb`` say how prompts name the items (``ItemWords``).
    """
    if rating_min is not None and rating_max is not None and rating_min > rating_max:
        raise ValueError(f"rating_min {rating_min} is above rating_max {rating_max}")
    words = ItemWords(item_noun, item_plural, item_verb)
    items = _csv_items(items_path, sep=sep, encoding=encoding, item_id_col=item_id_col or item_col,
                       title_col=title_col, genres_col=genres_col or None, year_col=year_col,
                       genre_sep=genre_sep)

    table = read_table(interactions_path, sep=sep, encoding=encoding, header=True)
    table.require_columns([user_col, item_col, rating_col, timestamp_col])
    interactions = pd.DataFrame({
        "user": table.integers(user_col, "user id"),
        "item": table.integers(item_col, "item id"),
        "rating": table.numbers(rating_col, "rating"),
        "timestamp": table.integers(timestamp_col, "timestamp"),
    })
    low = float(interactions["rating"].min()) if rating_min is None else float(rating_min)
    high = float(interactions["rating"].max()) if rating_max is None else float(rating_max)
    if low > high:  # one bound stated, beyond every rating: name the first rating it excludes
        if rating_min is not None:
            table.check_values(interactions["rating"] >= low, rating_col, "rating",
                               f"is below the stated minimum rating {low:g}")
        table.check_values(interactions["rating"] <= high, rating_col, "rating",
                           f"is above the stated maximum rating {high:g}")
    check_rating_range(table, rating_col, interactions["rating"], low, high)

    dropped: dict[str, int] = {}
    if drop_unknown_items:
        known = interactions["item"].isin(items["item"]).to_numpy()
        if not known.any():
            raise DataFormatError(interactions_path, None,
                                  f"no rating names an item of {Path(items_path).name}")
        interactions = interactions[known]  # row labels kept: later messages name the right lines
        dropped["unknown_item"] = int((~known).sum())
    else:
        table.known_ids(interactions["item"], items["item"], "item", items_path,
                        hint=" (--drop-unknown-items leaves such ratings out)")

    if users_path is None:
        users = pd.DataFrame({"user": np.sort(interactions["user"].unique())})
    else:
        users = _csv_users(users_path, sep=sep, encoding=encoding, user_col=user_col)
        table.known_ids(interactions["user"], users["user"], "user", users_path)

    return RawDataset(name=name, interactions=interactions.reset_index(drop=True), items=items,
                      users=users, rating_min=low, rating_max=high, words=words, dropped_rows=dropped)


def _csv_items(path: PathArg, *, sep: str, encoding: str, item_id_col: str, title_col: str,
               genres_col: str | None, year_col: str | None, genre_sep: str) -> pd.DataFrame:
    table = read_table(path, sep=sep, encoding=encoding, header=True)
    if genres_col is not None and genres_col not in table.frame.columns:
        raise DataFormatError(path, table.header_line,
                              f"missing column {genres_col!r} (found: {', '.join(table.frame.columns)}); "
                              "for items without genres pass --genres-col ''")
    used = [c for c in (item_id_col, title_col, genres_col, year_col) if c is not None]
    table.require_columns(used)
    ids = table.integers(item_id_col, "item id")
    table.unique_ids(ids, "item")

    titles = table.frame[title_col]
    if year_col is None:
        titles, years = split_title_year(titles)
    else:
        titles, years = titles.str.strip(), table.optional_integers(year_col, "year")
    genres = (normalise_genres(table.frame[genres_col], genre_sep) if genres_col is not None
              else pd.Series("", index=table.frame.index, dtype=str))

    items = pd.DataFrame({"item": ids, "title": titles, "genres": genres, "year": years})
    for column in table.frame.columns:
        if column not in used and column not in items.columns:
            items[column] = table.frame[column]
    return items


def _csv_users(path: PathArg, *, sep: str, encoding: str, user_col: str) -> pd.DataFrame:
    table = read_table(path, sep=sep, encoding=encoding, header=True)
    table.require_columns([user_col])
    ids = table.integers(user_col, "user id")
    table.unique_ids(ids, "user")
    users = pd.DataFrame({"user": ids})
    for column in table.frame.columns:
        if column != user_col and column != "user":
            users[column] = table.frame[column].str.strip()
    return users
