"""Tokenizer files any transformers version (and vLLM) can load."""

from __future__ import annotations

import json
from pathlib import Path


def portable_tokenizer_config(directory: Path, max_length: int) -> None:
    """Name the generic fast-tokenizer class, which loads from tokenizer.json everywhere, and drop
    load-time keys that describe this machine rather than the tokenizer."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
