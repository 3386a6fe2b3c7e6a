"""Prompts for dataset samples: the recent-K view and the semantic (SUBR) view of a history, in
either prompt form (``service.llm.prompt``).

A sample has one target, so in the shared form its candidate set is that target: semantic
retrieval then gives exactly the per-target history (``shared_positions`` of one candidate), and
only the layout differs (the history closes the prefix, the suffix is the question alone).
Requests of several samples (``training.llm.requests``) are prompted as served
(``request_prompts``): one prefix and a suffix per candidate, the shared form's history retrieved
for the request's whole candidate set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from service.llm.prompt import Behaviour, ItemText, PromptBuilder, PromptConfig, PromptForm
from service.retrieval.history import recent_positions, semantic_positions, shared_positions
from training.data.samples import PreparedData
from training.llm.requests import request_slices

View = Literal["recent", "semantic"]


def prompt_config_for(meta: Mapping[str, object], form: PromptForm = "per_target", *,
                      collab_tokens: bool = False) -> PromptConfig:
    """The prompt words of a prepared dataset in the given form (with collaborative tokens or
    not): its ``item_noun``, ``item_plural`` and ``item_verb`` (``meta.json``); a dataset
    prepared without them is about movies, worded as before."""
    noun = str(meta.get("item_noun", "movie"))
    plural = meta.get("item_plural")
    verb = meta.get("item_verb")
    words: dict[str, str] = {"item_noun": noun}
    if plural is not None and plural != f"{noun}s":
        words["item_plural"] = str(plural)
    if verb is not None:
        words["verb_past"] = str(verb)
    return PromptConfig(**words, form=form, collab_tokens=collab_tokens)


def catalog_texts(items: pd.DataFrame) -> dict[int, ItemText]:
    years = items["year"] if "year" in items else pd.Series([None] * len(items))
    return {
        int(i): ItemText(str(t), None if pd.isna(y) else int(y))
        for i, t, y in zip(items["item_idx"], items["title"], years)
    }


def user_profiles(users: pd.DataFrame) -> dict[int, dict[str, str]]:
    fields = [c for c in users.columns if c not in ("user", "user_idx")]
    return {int(row["user_idx"]): {f: row[f] for f in fields} for _, row in users.iterrows()}


def sample_prompts(data: PreparedData, samples: pd.DataFrame, builder: PromptBuilder, embeddings: np.ndarray,
                   k_text: int, view: View) -> list[list[int]]:
    """Full token ids (prefix + suffix) of each sample's prompt in the given view and the
    builder's form."""
    texts, profiles = catalog_texts(data.items), user_profiles(data.users)
    shared = builder.config.form == "shared"
    semantic = shared_positions if shared else _target_positions
    items = data.events["item_idx"].to_numpy()
    ratings = data.events["rating"].to_numpy()
    prefixes: dict[tuple[int, bool], list[int]] = {}
    out = []
    for user, target, end, n in samples[["user_idx", "item_idx", "hist_end", "hist_len"]].itertuples(index=False):
        hist_items, hist_ratings = items[end - n : end], ratings[end - n : end]
        if view == "recent":
            pos = recent_positions(len(hist_items), k_text)
        else:
            pos = semantic(hist_items, np.array([target]), embeddings, k_text)
        history = [Behaviour(texts[int(hist_items[p])], float(hist_ratings[p])) for p in pos]
        if shared:
            prefix, (suffix,) = builder.encode_shared(profiles[int(user)], history, [texts[int(target)]])
            out.append(prefix + suffix)
            continue
        key = (int(user), bool(history))
        if key not in prefixes:
            prefixes[key] = builder.encode_text(builder.prefix_text(profiles[int(user)], bool(history)))
        suffix = builder.encode_text(builder.suffix_text(history, texts[int(target)]))
        prefix, (suffix,) = builder.with_collab(prefixes[key], [suffix])
        out.append(prefix + suffix)
    return out


@dataclass(frozen=True)
class RequestPrompt:
    """One request's token ids: the prefix every candidate reads, and each candidate's suffix."""

    prefix: list[int]
    suffixes: list[list[int]]


def request_prompts(data: PreparedData, rows: pd.DataFrame, builder: PromptBuilder, embeddings: np.ndarray,
                    k_text: int, view: View) -> list[RequestPrompt]:
    """Each request of ``rows`` (``training.llm.requests``) as the gateway prompts it, in the
    builder's form: per-target, each candidate's own history in its suffix; shared, one history
    retrieved for the request's candidates closing the prefix."""
    texts, profiles = catalog_texts(data.items), user_profiles(data.users)
    items = data.events["item_idx"].to_numpy()
    ratings = data.events["rating"].to_numpy()
    columns = rows[["user_idx", "item_idx", "hist_end", "hist_len"]].to_numpy()
    out = []
    for part in request_slices(rows):
        user, _, end, n = (int(v) for v in columns[part.start])
        candidates = columns[part, 1].astype(np.int64)
        hist_items, hist_ratings = items[end - n : end], ratings[end - n : end]

        def behaviours(positions: np.ndarray) -> list[Behaviour]:
            return [Behaviour(texts[int(hist_items[p])], float(hist_ratings[p])) for p in positions]

        targets = [texts[int(c)] for c in candidates]
        if builder.config.form == "shared":
            pos = (recent_positions(n, k_text) if view == "recent"
                   else shared_positions(hist_items, candidates, embeddings, k_text))
            prefix, suffixes = builder.encode_shared(profiles[user], behaviours(pos), targets)
        else:
            own = ([recent_positions(n, k_text)] * len(candidates) if view == "recent"
                   else semantic_positions(hist_items, candidates, embeddings, k_text))
            prefix, suffixes = builder.encode(profiles[user], [behaviours(p) for p in own], targets)
        out.append(RequestPrompt(list(prefix), [list(s) for s in suffixes]))
    return out


def _target_positions(hist_items: np.ndarray, target: np.ndarray, embeddings: np.ndarray, k: int) -> np.ndarray:
    """The per-target form's retrieval for one target."""
    return semantic_positions(hist_items, target, embeddings, k)[0]


def mixed_views(n: int, seed: int) -> Sequence[View]:
    """ReiT: every sample appears once per view; the order of instances is shuffled by the trainer."""
    return ["recent"] * n + ["semantic"] * n
