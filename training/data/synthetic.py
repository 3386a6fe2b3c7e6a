"""A small synthetic ratings dataset with planted structure, for tests and offline demos.

Each item belongs mainly to one latent factor (shown as its genre) and each user strongly
prefers one factor, so "rating > 3" is predictable from the user's earlier ratings and the
item's identity, like on real data, while being generated in well under a second. The catalog
is of movies by default; ``item_noun="book"`` makes it a book catalog (titles, genres and the
words prompts use), any other noun keeps the movie genres under that noun.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.data.schema import ItemWords, RawDataset

GENRE_WORDS = ("Action", "Comedy", "Drama", "Romance", "Sci-Fi", "Horror", "Documentary",
               "Animation", "Thriller", "Western", "Musical", "Mystery")
BOOK_GENRES = ("Fantasy", "Mystery", "Romance", "Science Fiction", "Biography", "History", "Poetry",
               "Thriller", "Horror", "Travel", "Cookery", "Philosophy")
CATALOG_GENRES = {"movie": GENRE_WORDS, "book": BOOK_GENRES}
AGES = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
OCCUPATIONS = ("student", "engineer", "artist", "educator", "writer", "doctor", "retired",
               "programmer", "other")
START = 946_684_800  # 2000-01-01, seconds
SPAN = 2 * 365 * 24 * 3600  # two years of activity


def generate_synthetic(n_users: int = 300, n_items: int = 200, n_interactions: int = 12000,
                       n_factors: int = 4, seed: int = 0, item_noun: str = "movie",
                       item_plural: str | None = None, item_verb: str | None = None) -> RawDataset:
    """Generate users, items and ratings (1..5) deterministically from ``seed``.

    ``item_noun`` names the items ("Synthetic Book 7: Poetry Story") and, with ``item_plural`` and
    ``item_verb``, the prompts' words (``ItemWords``); it changes no random draw, so the ratings of
    a seed are the same for every noun.

    Timestamps are increasing per user, with users starting at different times but staying
    active to the end, so a global chronological 8:1:1 split has most users in every split.
    """
    if min(n_users, n_items, n_interactions, n_factors) < 1:
        raise ValueError("n_users, n_items, n_interactions and n_factors must be positive")
    if n_interactions > n_users * n_items:
        raise ValueError("n_interactions exceeds n_users * n_items (each pair is rated once)")
    words = ItemWords(item_noun, item_plural, item_verb)
    rng = np.random.default_rng(seed)
    genre_words = CATALOG_GENRES.get(words.noun, GENRE_WORDS)
    genre_names = [genre_words[f] if f < len(genre_words) else f"Genre {f + 1}"
                   for f in range(n_factors)]

    main = rng.integers(n_factors, size=n_items)
    item_vec = rng.normal(0.0, 0.3, (n_items, n_factors))
    item_vec[np.arange(n_items), main] += 1.0
    user_vec = rng.normal(0.0, 0.4, (n_users, n_factors))
    user_vec[np.arange(n_users), rng.integers(n_factors, size=n_users)] += 1.5
    quality = rng.normal(0.0, 0.4, n_items)
    affinity = user_vec @ item_vec.T + quality  # (users, items)

    counts = _per_user_counts(rng, n_users, n_items, n_interactions)
    # People mostly watch what they expect to like: Gumbel top-k sampling without replacement.
    keys = 0.8 * affinity + rng.gumbel(size=affinity.shape)
    order = np.argsort(-keys, axis=1)
    users, ranks = np.nonzero(np.arange(n_items) < counts[:, None])
    items = order[users, ranks]

    score = 2.9 + 1.3 * (affinity[users, items] - affinity.mean())
    rating = np.clip(np.rint(score + rng.normal(0.0, 0.5, users.size)), 1, 5)
    start = rng.uniform(0.0, 0.6, n_users)[users]
    when = START + SPAN * (start + (1.0 - start) * rng.uniform(size=users.size))

    interactions = pd.DataFrame({
        "user": users.astype(np.int64) + 1,
        "item": items.astype(np.int64) + 1,
        "rating": rating.astype(np.float64),
        "timestamp": when.astype(np.int64),
    }).sort_values(["timestamp", "user", "item"], ignore_index=True)
    return RawDataset(
        name="synthetic",
        interactions=interactions,
        items=_items(rng, item_vec, main, genre_names, words.noun),
        users=_users(rng, n_users),
        rating_min=1.0,
        rating_max=5.0,
        words=words,
    )


def _per_user_counts(rng: np.random.Generator, n_users: int, n_items: int,
                     total: int) -> np.ndarray:
    """Skewed activity per user, capped at n_items, summing exactly to ``total``."""
    counts = np.minimum(rng.multinomial(total, rng.dirichlet(np.full(n_users, 2.0))), n_items)
    while (missing := total - counts.sum()) > 0:
        room = n_items - counts
        counts += np.minimum(rng.multinomial(missing, room / room.sum()), room)
    return counts


def _items(rng: np.random.Generator, item_vec: np.ndarray, main: np.ndarray,
           genre_names: list[str], noun: str) -> pd.DataFrame:
    n_items = len(main)
    second = np.argsort(-item_vec, axis=1)[:, 1]
    has_second = item_vec[np.arange(n_items), second] > 0.35
    genres = [
        genre_names[m] + (f"|{genre_names[s]}" if extra else "")
        for m, s, extra in zip(main, second, has_second)
    ]
    years = pd.array(rng.integers(1960, 2021, size=n_items), dtype="Int64")
    years[rng.uniform(size=n_items) < 0.02] = pd.NA  # real catalogues have undated items too
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    kind = noun[:1].upper() + noun[1:]
    return pd.DataFrame({
        "item": ids,
        "title": [f"Synthetic {kind} {i}: {genre_names[m]} Story" for i, m in zip(ids, main)],
        "genres": pd.Series(genres, dtype=str),
        "year": years,
    })


def _users(rng: np.random.Generator, n_users: int) -> pd.DataFrame:
    return pd.DataFrame({
        "user": np.arange(1, n_users + 1, dtype=np.int64),
        "gender": pd.Series(rng.choice(["female", "male"], n_users), dtype=str),
        "age": pd.Series(rng.choice(AGES, n_users), dtype=str),
        "occupation": pd.Series(rng.choice(OCCUPATIONS, n_users), dtype=str),
    })
