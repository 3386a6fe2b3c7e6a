"""Fixtures of the scoring tests: the shared world's bundle, loaded with its prompt builder."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.llm.prompt import PromptBuilder
from service.model import load_model


@pytest.fixture(scope="module")
def loaded(world):
    """(model, prompt builder) of the world's bundle, loaded once per module."""
    model = load_model(world.bundle_dir)
    builder = PromptBuilder(AutoTokenizer.from_pretrained(world.base_dir, local_files_only=True), model.prompt)
    return model, builder
