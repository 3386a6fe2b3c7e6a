"""A ``Telemetry`` that records what components report, for tests to read back."""

from __future__ import annotations

from collections import defaultdict
from enum import StrEnum


class RecordedTelemetry:
    """Every count and measurement, in order; ``of(Kind)`` is the live list of one enum's members as
    reported, ``values(member)`` what was counted or measured under one member."""

    def __init__(self) -> None:
        self.counts: list[tuple[StrEnum, float, str | None]] = []
        self.measures: list[tuple[StrEnum, float, str | None]] = []
        self._by_kind: defaultdict[type, list[StrEnum]] = defaultdict(list)

    def count(self, outcome: StrEnum, n: float = 1, *, on: str | None = None) -> None:
        self.counts.append((outcome, n, on))
        self._by_kind[type(outcome)].append(outcome)

    def measure(self, quantity: StrEnum, value: float, *, on: str | None = None) -> None:
        self.measures.append((quantity, value, on))
        self._by_kind[type(quantity)].append(quantity)

    def of(self, kind: type[StrEnum]) -> list[StrEnum]:
        return self._by_kind[kind]

    def total(self, outcome: StrEnum) -> float:
        return sum(n for o, n, _ in self.counts if o is outcome)

    def values(self, quantity: StrEnum) -> list[tuple[float, str | None]]:
        return [(v, on) for q, v, on in self.measures if q is quantity]
