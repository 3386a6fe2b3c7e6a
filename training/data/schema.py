"""The in-memory shape every dataset loader returns, whatever the source format.

Keeping one shape lets samples, splits, embeddings and the CRM ignore where the data came from.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

INTERACTION_COLUMNS = ("user", "item", "rating", "timestamp")
ITEM_COLUMNS = ("item", "title", "genres", "year")

# What the user did with an item, as a past participle that also reads as the simple past
# ("The user read the following books", "the books the user has read").
ITEM_VERBS = {
    "movie": "watched", "film": "watched", "show": "watched", "series": "watched", "episode": "watched",
    "video": "watched", "book": "read", "novel": "read", "article": "read", "comic": "read",
    "song": "listened to", "track": "listened to", "album": "listened to", "podcast": "listened to",
    "game": "played",
}
GENERIC_ITEM_VERB = "interacted with"
MAX_WORD_CHARS = 40


def _check_word(what: str, value: str) -> str:
    text = value.strip()
    if not text or len(text) > MAX_WORD_CHARS or text != value or any(
            unicodedata.category(ch).startswith("C") or ch == "*" for ch in text):
        raise ValueError(f"{what} {value!r} must be 1 to {MAX_WORD_CHARS} printable characters on one line, "
                         "without leading or trailing spaces or '*'")
    return text


@dataclass(frozen=True)
class ItemWords:
    """How prompts name a dataset's items: the noun ("book"), its plural ("books", by default the
    noun + "s") and what the user did with one ("read"; by default looked up in ``ITEM_VERBS``,
    else "interacted with")."""

    noun: str = "movie"
    plural: str | None = None
    verb: str | None = None

    def __post_init__(self) -> None:
        noun = _check_word("item noun", self.noun)
        object.__setattr__(self, "plural", _check_word("item plural", self.plural or f"{noun}s"))
        object.__setattr__(self, "verb", _check_word(
            "item verb", self.verb or ITEM_VERBS.get(noun.lower(), GENERIC_ITEM_VERB)))

    def meta(self) -> dict[str, str]:
        """The words as recorded in a prepared dataset's ``meta.json``."""
        return {"item_noun": self.noun, "item_plural": str(self.plural), "item_verb": str(self.verb)}


@dataclass(frozen=True)
class RawDataset:
    """A recommendation dataset with raw (source) ids.

    interactions: columns user (int64), item (int64), rating (float64), timestamp (int64, seconds).
    items: columns item (int64, unique), title (str), genres (str, '|'-separated, may be empty),
        year (Int64, nullable); extra text columns may follow and are kept for prompts.
    users: column user (int64, unique) plus categorical profile columns (str), e.g. gender, age,
        occupation; may have only the user column when the source has no profiles.
    words: how prompts name the items (movies unless the source says otherwise).
    dropped_rows: source rows left out on request, by reason (e.g. {"unknown_item": 12}).
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    rating_min: float
    rating_max: float
    words: ItemWords = ItemWords()
    dropped_rows: Mapping[str, int] = field(default_factory=dict)
