"""A new user's trial on a catalog that is not movies, end to end.

A book catalog and its ratings are written as CSV files, prepared with ``reclora prepare --format csv
--item-noun book`` (no rating-range flags), a small CRM and a tiny LLM's LoRA are trained on them, the
bundle is exported and served over real HTTP with the histories in the real Redis. The test scores a
user, reads the user's history back from Redis, and checks that the prompts built for the user talk
about books, never movies, and that the served LLM scores are those of the book prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.e2e.e2e_support import EMBEDDING_DIM, REDIS_URL, LiveServer, Reference, World, read_history, train_lora
from tests.redis_support import scratch_prefix
from typer.testing import CliRunner

from service.bundle import BundleError
from service.history import bulk_load
from service.llm.prompt import PROMPT_VERSION, PromptBuilder, PromptConfig
from service.model import load_model

VERSION = "books-v1"
CANDIDATES = [2, 11, 23, 37, 52, 64]
# Words of the synthetic book titles and of the book wording, so the tiny tokenizer decodes the
# prompts back to their exact text (a word outside its vocabulary would become <unk>).
EXTRA_WORDS = ["read", "synthetic", "poetry", "science", "fiction", "biography", "history", "fantasy"]
MOVIE_WORDS = ("movie", "movies", "Movie", "Movies", "watched", "Watched")


@dataclass
class Books:
    world: World
    live: LiveServer
    csv_dir: Path


def write_book_csvs(root: Path) -> Path:
    """ratings.csv (half stars, 0.5..5) and books.csv (title with its year, genres) as a user has them."""
    from training.data.synthetic import generate_synthetic

    raw = generate_synthetic(n_users=120, n_items=80, n_interactions=3000, seed=3, item_noun="book")
    ratings = raw.interactions.rename(columns={"user": "user_id", "item": "book_id"})
    ratings["rating"] = ratings["rating"] - 0.5 * (ratings.index % 2 == 1)
    ratings.to_csv(root / "ratings.csv", index=False)
    years = raw.items["year"].astype("string").fillna("")
    titles = [f"{t} ({y})" if y else t for t, y in zip(raw.items["title"], years)]
    pd.DataFrame({"book_id": raw.items["item"], "title": titles, "genres": raw.items["genres"]}).to_csv(
        root / "books.csv", index=False)
    return root


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Iterator[Books]:
    from tests.tiny_llama import DEFAULT_WORDS, build_tiny_llama
    from training.cli import app
    from training.crm.checkpoint import save_checkpoint
    from training.crm.train import TrainConfig, train_crm
    from training.data.samples import PreparedData
    from training.export.crm_bundle import export_crm_bundle
    from training.history_loader import histories_from_prepared
    from training.llm.fusion_fit import FusionOptions

    root = tmp_path_factory.mktemp("books")
    csv_dir = write_book_csvs(root)
    result = CliRunner().invoke(app, [
        "prepare", "--format", "csv", "--interactions", str(csv_dir / "ratings.csv"),
        "--items", str(csv_dir / "books.csv"), "--user-col", "user_id", "--item-col", "book_id",
        "--item-noun", "book", "--out", str(root / "data")])
    assert result.exit_code == 0, result.output
    data = PreparedData.load(root / "data")
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(data.items) + 1, EMBEDDING_DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings[0] = 0
    np.save(root / "data" / "embeddings.npy", embeddings)

    trained = train_crm(data, embeddings, TrainConfig(epochs=1, batch_size=256, progress=False, model=dict(
        emb_dim=16, l_crm=20, l_recent=20, mlp_hidden=[64, 32])))
    crm_dir = save_checkpoint(trained, root / "crm")
    base_dir = build_tiny_llama(root / "base", vocab_words=[*DEFAULT_WORDS, *EXTRA_WORDS])
    train_lora(data, embeddings, crm_dir, base_dir, root / "lora")
    store = root / "model_store"
    bundle_dir = export_crm_bundle(root / "data", crm_dir, store, VERSION, description="book catalog",
                                   llm_dir=root / "lora", base_model=base_dir, fusion=FusionOptions(serve="fused"))

    with scratch_prefix("books") as prefix:
        records = list(histories_from_prepared(data))
        counts = bulk_load(REDIS_URL, records, prefix=prefix, progress=False, total=len(records))
        assert counts["users"] == len(data.users)
        histories = {user: (items, ratings, stamps, profile) for user, items, ratings, stamps, profile in records}
        users = sorted((u for u, h in histories.items() if len(h[0]) >= 10), key=lambda u: -len(histories[u][0]))
        world = World(root, data, base_dir, store, VERSION, bundle_dir, prefix, histories, users, len(data.items))
        live = LiveServer.start(world.settings(torch_dtype="float32"))
        try:
            yield Books(world, live, csv_dir)
        finally:
            live.stop()


def test_a_book_catalog_is_prepared_trained_exported_and_served(books: Books) -> None:
    world = books.world
    meta = world.data.meta
    assert (meta["rating_min"], meta["rating_max"]) == (0.5, 5.0)  # inferred: no range flags were given
    assert (meta["item_noun"], meta["item_plural"], meta["item_verb"]) == ("book", "books", "read")

    model = load_model(world.bundle_dir)
    assert (model.prompt.item_noun, model.prompt.items_noun, model.prompt.verb_past) == ("book", "books", "read")
    assert model.prompt.version != PROMPT_VERSION and model.prompt.version.startswith(PROMPT_VERSION + "+")
    assert model.bundle.manifest.components["llm"].config["prompt_version"] == model.prompt.version
    assert json.loads((world.bundle_dir / "dataset.json").read_text())["item_noun"] == "book"
    assert model.catalog.items["title"].str.startswith("Synthetic Book ").all()

    user = world.users[0]
    with books.live.client() as http:
        response = http.post("/v1/score", json={"user_id": user, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == VERSION and body["degraded"] is False and body["cold_start"] is False
    served = np.asarray([s["llm_score"] for s in body["scores"]], dtype=np.float64)
    assert [s["item_id"] for s in body["scores"]] == CANDIDATES

    # The history the service read is the one loaded, as stored in Redis.
    items, ratings, stamps, profile = world.histories[user]
    stored = read_history(world, user)
    assert stored.exists and stored.profile == profile
    np.testing.assert_array_equal(stored.items, items)
    np.testing.assert_array_equal(stored.ratings, ratings)
    np.testing.assert_array_equal(stored.timestamps, stamps)

    # The prompts built for this user on the bundle's prompt config: books, never movies.
    reference = Reference(world)
    tokenizer = reference.builder.tokenizer
    prefix, suffixes = reference.sequences(user, CANDIDATES)
    texts = [tokenizer.decode(prefix + suffix) for suffix in suffixes]
    movie_ids = set(tokenizer.convert_tokens_to_ids(list(MOVIE_WORDS)))
    for text, suffix in zip(texts, suffixes):
        assert "<unk>" not in text  # every word is known: the decoded text is the prompt itself
        assert "The user read the following books in order in the past" in text
        assert "deduce if the user will like the book ***Synthetic Book " in text
        assert "movie" not in text.lower() and "watched" not in text
        assert not movie_ids & set(prefix + suffix)

    # The service scored exactly these prompts: the float32 reference on them gives its numbers,
    # and the movie wording of the same history would have given others.
    np.testing.assert_allclose(served, reference.llm_scores(user, CANDIDATES), atol=1e-4)
    reference.builder = PromptBuilder(tokenizer, PromptConfig())
    movie_prefix, _ = reference.sequences(user, CANDIDATES)
    assert "movies" in tokenizer.decode(movie_prefix)
    assert np.abs(reference.llm_scores(user, CANDIDATES) - served).max() > 1e-3


def test_a_lora_trained_on_books_is_not_exported_with_a_movie_dataset(books: Books, tmp_path: Path) -> None:
    from training.data.samples import prepare
    from training.data.synthetic import generate_synthetic
    from training.export.crm_bundle import export_crm_bundle

    world = books.world
    movies = prepare(generate_synthetic(n_users=120, n_items=80, n_interactions=3000, seed=3)).save(tmp_path / "m")
    (movies / "embeddings.npy").write_bytes((world.data_dir / "embeddings.npy").read_bytes())
    with pytest.raises(BundleError, match="trained on prompts about books .* names its items movies"):
        export_crm_bundle(movies, world.crm_dir, tmp_path / "store", "movies-v1", llm_dir=world.root / "lora")
    assert not (tmp_path / "store" / "movies-v1").exists()
