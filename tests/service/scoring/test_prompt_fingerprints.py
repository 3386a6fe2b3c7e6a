"""Score-cache fingerprints of prompts with collaborative tokens: a candidate's digest follows the
vectors its tokens read, not the call-relative ids that name them."""

import hashlib

import numpy as np
import torch

from service.engine.base import UserAdapter
from service.llm.collab_tokens import EMBED_ID_BASE
from service.scoring.pipeline import prompt_fingerprints
from service.scoring.stages import UserHistoryView

ADAPTER = UserAdapter("u@v#0", {}, 1.0)
VIEW = UserHistoryView(np.array([3, 4], np.int64), np.array([4.0, 5.0], np.float32), {"age": "25"})
PREFIX = [1, 2, EMBED_ID_BASE]


def suffix(row: int) -> list[int]:
    return [5, EMBED_ID_BASE + row, 6]


def test_a_candidate_digest_follows_its_vectors_not_its_position() -> None:
    user, a, b = torch.randn(3, 4).unbind()
    first = prompt_fingerprints(ADAPTER, VIEW, PREFIX, [suffix(1), suffix(2)], torch.stack([user, a, b]))
    swapped = prompt_fingerprints(ADAPTER, VIEW, PREFIX, [suffix(1), suffix(2)], torch.stack([user, b, a]))
    assert first[0] == swapped[1] and first[1] == swapped[0]
    other_user = prompt_fingerprints(ADAPTER, VIEW, PREFIX, [suffix(1), suffix(2)], torch.stack([-user, a, b]))
    assert set(other_user).isdisjoint(first)


def test_plain_prompts_are_digested_as_before() -> None:
    """Without collaborative tokens the digest is the one the score cache already holds."""
    base = hashlib.blake2b(digest_size=16)
    for part in (ADAPTER.key.encode(), VIEW.items.tobytes(), VIEW.ratings.tobytes(),
                 repr(sorted(VIEW.profile.items())).encode(), np.asarray([1, 2], np.int64).tobytes()):
        base.update(part)
    expected = []
    for s in ([5, 6], [5, 7]):
        h = base.copy()
        h.update(b"|")
        h.update(np.asarray(s, np.int64).tobytes())
        expected.append(h.hexdigest())
    assert prompt_fingerprints(ADAPTER, VIEW, [1, 2], [[5, 6], [5, 7]]) == expected
