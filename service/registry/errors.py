"""Why a push or activation is refused; importable without the model runtime (no torch)."""

from __future__ import annotations


class ValidationFailed(ValueError):
    """A version failed a check; ``reason`` is a bounded metrics label (``REFUSAL_REASONS``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
