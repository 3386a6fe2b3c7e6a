"""Why a push or activation is refused, and how a version became active; importable without the
model runtime (no torch).

``RefusalReason`` values are the ``reason`` label of ``reclora_model_refusals`` and the ``type``
of the 422's detail: one definition for the registry, the admin API and the metrics.
``ActivationKind`` values are the ``kind`` label of ``reclora_model_activations``.
"""

from __future__ import annotations

from enum import StrEnum


class RefusalReason(StrEnum):
    UNAUTHORIZED = "unauthorized"  # admin API: missing or wrong bearer token
    NAME = "name"  # the version name is not a valid name
    EXISTS = "exists"  # the version exists already (versions are immutable)
    TOO_LARGE = "too_large"  # the upload exceeds its byte limit
    ARCHIVE = "archive"  # the upload is not a valid archive of bundle files
    BUNDLE = "bundle"  # manifest schema, sizes, hashes or file kinds
    INCOMPATIBLE = "incompatible"  # the parts do not fit together or the base model
    RANK_LIMIT = "rank_limit"  # LoRA rank above the serving limit
    PROTOTYPE_LIMIT = "prototype_limit"  # more prototype adapters than the servers keep loaded
    PROMPT_MISMATCH = "prompt_mismatch"  # answer tokens differ from the engine's, or the form from the LoRA's
    SMOKE_TEST = "smoke_test"  # golden requests failed to score or gave bad probabilities
    NO_ENGINE = "no_engine"  # a LoRA version on a service without an LLM engine


class ActivationKind(StrEnum):
    """How a version became the active one."""

    ACTIVATE = "activate"
    ROLLBACK = "rollback"
    FOLLOW = "follow"  # another gateway's activation, read from the store's pointer
    PROMOTE = "promote"  # a canary's candidate promoted


class ValidationFailed(ValueError):
    """A version failed a check; ``reason`` is a bounded metrics label."""

    def __init__(self, reason: RefusalReason | str, message: str) -> None:
        super().__init__(message)
        self.reason = RefusalReason(reason)
