"""The versions being served, swapped atomically: every request reads them once, as one snapshot.

A snapshot is the stable version and, during a canary, the candidate with its share of users:
a user is assigned to the candidate by a hash of their id salted with the candidate's name, so
they stay on one side for the whole canary, raising the share only adds users, and two canaries
of different versions draw different users.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from service.llm.prompt import PromptBuilder
from service.model.loaded import LoadedModel

BUCKETS = 10_000  # percent resolution of the assignment: 0.01 %


def user_bucket(user_id: str, salt: str) -> int:
    """The user's bucket in [0, BUCKETS) for ``salt``: stable across processes and restarts (a
    keyed digest, unlike Python's per-process salted ``hash``)."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") % BUCKETS


@dataclass(frozen=True)
class Canary:
    """A candidate version and the share of users it takes: served to them, or with ``shadow``
    scored beside the stable version on their requests and recorded, never served."""

    candidate: "ModelSnapshot"
    percent: float
    shadow: bool = False

    def assigned(self, user_id: str) -> bool:
        return user_bucket(user_id, self.candidate.version) < round(self.percent * BUCKETS / 100)


@dataclass(frozen=True)
class ModelSnapshot:
    """One version's model and the prompt builder for its prompt config (None without an LLM);
    the snapshot a request takes also carries the canary, if one runs."""

    model: LoadedModel
    builder: PromptBuilder | None
    canary: Canary | None = None

    @property
    def version(self) -> str:
        return self.model.version

    def route(self, user_id: str) -> tuple["ModelSnapshot", "ModelSnapshot | None"]:
        """(the version that serves this user, the version that shadows their request or None)."""
        stable = ModelSnapshot(self.model, self.builder) if self.canary is not None else self
        if self.canary is None or not self.canary.assigned(user_id):
            return stable, None
        if self.canary.shadow:
            return stable, self.canary.candidate
        return self.canary.candidate, None


class ModelHolder:
    """The active model version and the canary. A request takes ``snapshot()`` once and uses only
    that for every step (routing, catalog check, CRM, prompts, fusion), so a swap never mixes
    versions within a request. A withdrawn version (an aborted canary) is never answered with
    again: the pipeline scores a request that read it before the abort anew."""

    def __init__(self, model: LoadedModel, builder: PromptBuilder | None) -> None:
        self._current = ModelSnapshot(model, builder)
        self._withdrawn: frozenset[str] = frozenset()
        self._lock = threading.Lock()  # writers only: readers take the reference as it is

    def snapshot(self) -> ModelSnapshot:
        return self._current

    @property
    def version(self) -> str:
        return self._current.version

    @property
    def canary(self) -> Canary | None:
        return self._current.canary

    def swap(self, model: LoadedModel, builder: PromptBuilder | None) -> ModelSnapshot:
        """Serve ``model`` from now on; returns the snapshot it replaced. A canary of ``model``
        (a promotion) ends; any other canary goes on beside the new stable version."""
        with self._lock:
            previous = self._current
            canary = previous.canary if previous.canary and previous.canary.candidate.version != model.version else None
            self._current = ModelSnapshot(model, builder, canary)
            self._withdrawn -= {model.version}
            return ModelSnapshot(previous.model, previous.builder)

    def start_canary(self, model: LoadedModel, builder: PromptBuilder | None, percent: float,
                     shadow: bool) -> None:
        """Route ``percent`` % of users to ``model`` (or shadow their requests with it)."""
        if model.version == self.version:
            raise ValueError(f"{model.version} is the stable version; a canary needs another one")
        with self._lock:
            current = self._current
            self._current = ModelSnapshot(current.model, current.builder,
                                          Canary(ModelSnapshot(model, builder), percent, shadow))
            self._withdrawn -= {model.version}

    def end_canary(self, *, withdraw: bool) -> ModelSnapshot | None:
        """Every user on the stable version again; returns the candidate it served, if any. With
        ``withdraw`` (an abort) no answer of the candidate leaves the gateway from now on."""
        with self._lock:
            current = self._current
            if current.canary is None:
                return None
            candidate = current.canary.candidate
            self._current = ModelSnapshot(current.model, current.builder)
            if withdraw:
                self._withdrawn |= {candidate.version}
            return candidate

    def withdrawn(self, version: str) -> bool:
        return version in self._withdrawn
