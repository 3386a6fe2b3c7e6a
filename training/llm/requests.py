"""Request-shaped samples: several candidates of one user scored against one history, as served.

The gateway scores a request's candidates together, against the user's history at request time;
in the shared prompt form the history is retrieved once for the whole candidate set. A dataset
sample has one target and its own history, so training and evaluation of that form group samples
into requests: every row of a request keeps its own target and label but reads the history of the
request (``hist_end`` and ``hist_len`` of its first row), and ``request`` numbers the requests
(rows of one request are adjacent). A request of one row is the sample as it is.

- ``anchored_requests``: training. Seeded anchors, each with the same user's next samples of the
  split (what the user rated next), until the draw holds ``n`` rows.
- ``user_requests``: evaluation. A drawn subset grouped by user in time order, at most ``size``
  rows a request, so the rows (and labels) are those of the draw itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HISTORY = ["hist_end", "hist_len"]


def anchored_requests(split: pd.DataFrame, n: int, size: int, seed: int) -> pd.DataFrame:
    """``n`` rows of ``split`` in requests of at most ``size``: anchors in a seeded order, each
    followed by its user's next rows of the split (fewer at the end of a user's rows)."""
    if size < 1:
        raise ValueError(f"a request holds at least one row, got size {size}")
    ordered = split.sort_values(["user_idx", "hist_end"], kind="stable").reset_index()
    starts, ends = _runs(ordered["user_idx"].to_numpy())
    same_user_end = np.repeat(ends, ends - starts)  # one past each row's user's last row
    anchors = np.random.default_rng(seed).permutation(len(ordered))
    parts, total = [], 0
    for request, anchor in enumerate(anchors):
        if total >= n:
            break
        stop = min(anchor + size, same_user_end[anchor], anchor + n - total)
        rows = ordered.iloc[anchor:stop].copy()
        rows[HISTORY] = rows[HISTORY].iloc[0].to_numpy()
        rows["request"] = request
        parts.append(rows)
        total += len(rows)
    out = pd.concat(parts).set_index("index")
    out.index.name = None
    return out


def user_requests(samples: pd.DataFrame, size: int) -> pd.DataFrame:
    """``samples`` grouped into requests: each user's rows in time order, ``size`` at a time, each
    request reading the history of its earliest row."""
    if size < 1:
        raise ValueError(f"a request holds at least one row, got size {size}")
    ordered = samples.sort_values(["user_idx", "hist_end"], kind="stable")
    rank = ordered.groupby("user_idx").cumcount().to_numpy() // size
    keys = pd.DataFrame({"user": ordered["user_idx"].to_numpy(), "chunk": rank})
    request = keys.groupby(["user", "chunk"], sort=False).ngroup().to_numpy()
    out = ordered.copy()
    out["request"] = request
    first = out.groupby("request")[HISTORY].transform("first")
    out[HISTORY] = first.to_numpy()
    return out


def request_slices(rows: pd.DataFrame) -> list[slice]:
    """Each request's rows in ``rows`` (adjacent, numbered by ``request``)."""
    starts, ends = _runs(rows["request"].to_numpy())
    return [slice(int(s), int(e)) for s, e in zip(starts, ends)]


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of equal adjacent values."""
    bounds = np.flatnonzero(np.diff(values)) + 1
    return np.insert(bounds, 0, 0), np.append(bounds, len(values))
