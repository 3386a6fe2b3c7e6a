from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data.samples import PreparedData, SplitConfig, prepare
from training.data.synthetic import generate_synthetic

ML100K = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="module")
def prepared() -> PreparedData:
    return prepare(generate_synthetic(seed=1))


def test_every_history_event_precedes_its_sample(prepared: PreparedData) -> None:
    ev = prepared.events
    for _, s in prepared.samples.sample(500, random_state=0).iterrows():
        hist = prepared.history(s)
        assert len(hist) == s["hist_len"] >= 5
        assert (hist["user_idx"] == s["user_idx"]).all()
        assert (hist["order"] < s["order"]).all()
        assert (hist["timestamp"] <= s["timestamp"]).all()
        # the history is *all* earlier interactions of the user, in order
        earlier = ev[(ev["user_idx"] == s["user_idx"]) & (ev["order"] < s["order"])]
        assert hist["order"].tolist() == earlier["order"].tolist()


def test_split_is_chronological(prepared: PreparedData) -> None:
    ts = {name: prepared.split(name)["timestamp"] for name in ("train", "valid", "test")}
    assert ts["train"].max() <= ts["valid"].min()
    assert ts["valid"].max() <= ts["test"].min()
    assert prepared.split("train")["order"].max() < prepared.split("valid")["order"].min()


def test_ratios_labels_and_min_history() -> None:
    raw = generate_synthetic(seed=2)
    data = prepare(raw, SplitConfig(min_history=0))
    n = len(raw.interactions)
    counts = data.samples["split"].value_counts()
    assert counts["train"] == round(0.8 * n) and counts["test"] == n - round(0.9 * n)
    assert (data.samples["label"] == (data.samples["rating"] > 3)).all()
    strict = prepare(raw, SplitConfig(min_history=5))
    assert strict.samples["hist_len"].min() >= 5
    assert len(strict.samples) == (data.samples["hist_len"] >= 5).sum()


def test_ids_are_dense_and_round_trip(prepared: PreparedData, tmp_path: Path) -> None:
    assert prepared.items["item_idx"].tolist() == list(range(1, len(prepared.items) + 1))
    assert prepared.users["user_idx"].min() == 1
    prepared.save(tmp_path)
    loaded = PreparedData.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.samples, prepared.samples)
    assert loaded.meta == prepared.meta


def test_load_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="samples.parquet"):
        PreparedData.load(tmp_path)


@pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not available")
def test_ml100k_protocol_counts() -> None:
    from training.data.movielens import load_ml100k

    data = prepare(load_ml100k(ML100K))
    assert data.meta["n_samples"]["test"] == 9616
    assert np.isclose(data.meta["positive_rate"]["test"], 0.5622, atol=1e-3)


def test_meta_records_the_item_words_and_dropped_rows(tmp_path: Path) -> None:
    from training.llm.prompts import prompt_config_for

    movies = prepare(generate_synthetic(n_users=30, n_items=20, n_interactions=300))
    assert (movies.meta["item_noun"], movies.meta["item_plural"], movies.meta["item_verb"]) == \
        ("movie", "movies", "watched")
    assert movies.meta["dropped_rows"] == {}
    books = PreparedData.load(prepare(generate_synthetic(n_users=30, n_items=20, n_interactions=300,
                                                         item_noun="book")).save(tmp_path))
    assert (books.meta["item_noun"], books.meta["item_plural"], books.meta["item_verb"]) == ("book", "books", "read")
    # the words carried into the prompt: the movie wording is the original prompt version
    assert prompt_config_for(movies.meta).version == "rella-chat-v1"
    assert prompt_config_for({}) == prompt_config_for(movies.meta)  # datasets prepared before the words
    book_prompt = prompt_config_for(books.meta)
    assert (book_prompt.item_noun, book_prompt.items_noun, book_prompt.verb_past) == ("book", "books", "read")
    assert book_prompt.version != "rella-chat-v1"
