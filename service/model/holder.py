"""The version being served, swapped atomically: every request reads it once, as one snapshot."""

from __future__ import annotations

from dataclasses import dataclass

from service.llm.prompt import PromptBuilder
from service.model.loaded import LoadedModel


@dataclass(frozen=True)
class ModelSnapshot:
    """One version's model and the prompt builder for its prompt config (None without an LLM)."""

    model: LoadedModel
    builder: PromptBuilder | None

    @property
    def version(self) -> str:
        return self.model.version


class ModelHolder:
    """The active model version. A request takes ``snapshot()`` once and uses only that for every
    step (catalog check, CRM, prompts, fusion), so a swap never mixes versions within a request."""

    def __init__(self, model: LoadedModel, builder: PromptBuilder | None) -> None:
        self._current = ModelSnapshot(model, builder)

    def snapshot(self) -> ModelSnapshot:
        return self._current

    @property
    def version(self) -> str:
        return self._current.version

    def swap(self, model: LoadedModel, builder: PromptBuilder | None) -> ModelSnapshot:
        """Serve ``model`` from now on; returns the snapshot it replaced."""
        previous, self._current = self._current, ModelSnapshot(model, builder)
        return previous
