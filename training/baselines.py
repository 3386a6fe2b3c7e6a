"""Reference models the CRM must beat on the same split: item popularity and logistic regression."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from training.data.samples import PreparedData


def popularity_scores(data: PreparedData, split: str, prior: float = 20.0) -> np.ndarray:
    """Each item's positive rate on the training split, smoothed toward the global rate."""
    train = data.split("train")
    base = float(train["label"].mean())
    stats = train.groupby("item_idx")["label"].agg(["sum", "count"])
    rate = (stats["sum"] + prior * base) / (stats["count"] + prior)
    return data.split(split)["item_idx"].map(rate).fillna(base).to_numpy(np.float64)


def history_summary(data: PreparedData, samples: pd.DataFrame) -> np.ndarray:
    """(N, 3): mean rating (scaled to [0, 1]), positive share and log length of each history."""
    ev = data.events
    pos = (ev["rating"].to_numpy(np.float64) > data.meta["label_threshold"]).astype(np.float64)
    cum_r = np.concatenate([[0.0], np.cumsum(ev["rating"].to_numpy(np.float64))])
    cum_p = np.concatenate([[0.0], np.cumsum(pos)])
    end, n = samples["hist_end"].to_numpy(), samples["hist_len"].to_numpy()
    count = np.maximum(n, 1)
    span = max(data.meta["rating_max"] - data.meta["rating_min"], 1e-6)
    mean = ((cum_r[end] - cum_r[end - n]) / count - data.meta["rating_min"]) / span
    return np.stack([mean, (cum_p[end] - cum_p[end - n]) / count, np.log1p(n) / np.log1p(1000)], 1)


class LogisticBaseline:
    """Logistic regression on one-hot item and user profile, item genres and history summary."""

    def __init__(self, data: PreparedData, C: float = 0.5) -> None:
        self.data = data
        self.fields = [c for c in data.users.columns if c not in ("user", "user_idx")]
        self.vocab = {c: {v: i for i, v in enumerate(sorted(data.users[c].astype(str).unique()))} for c in self.fields}
        self.genres = sorted({g for t in data.items["genres"].fillna("") for g in str(t).split("|") if g})
        self.model = LogisticRegression(C=C, max_iter=2000)

    def features(self, samples: pd.DataFrame) -> sp.csr_matrix:
        n_items = int(self.data.items["item_idx"].max()) + 1
        rows = np.arange(len(samples))
        blocks = [sp.csr_matrix((np.ones(len(samples)), (rows, samples["item_idx"].to_numpy())), shape=(len(samples), n_items))]
        users = self.data.users.set_index("user_idx").loc[samples["user_idx"].to_numpy()]
        for c in self.fields:
            cols = users[c].astype(str).map(self.vocab[c]).fillna(0).to_numpy(int)
            blocks.append(sp.csr_matrix((np.ones(len(samples)), (rows, cols)), shape=(len(samples), len(self.vocab[c]))))
        genre_of = self.data.items.set_index("item_idx")["genres"].fillna("")
        index = {g: i for i, g in enumerate(self.genres)}
        r, c = [], []
        for i, text in enumerate(genre_of.loc[samples["item_idx"].to_numpy()]):
            for g in str(text).split("|"):
                if g in index:
                    r.append(i)
                    c.append(index[g])
        blocks.append(sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(samples), max(len(self.genres), 1))))
        blocks.append(sp.csr_matrix(history_summary(self.data, samples)))
        return sp.hstack(blocks).tocsr()

    def fit(self) -> "LogisticBaseline":
        train = self.data.split("train")
        self.model.fit(self.features(train), train["label"].to_numpy())
        return self

    def predict(self, split: str) -> np.ndarray:
        return self.model.predict_proba(self.features(self.data.split(split)))[:, 1]
