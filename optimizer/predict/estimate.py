"""The value type of every prediction: a central value and an interval."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """A predicted quantity: ``value`` with the interval ``[low, high]`` (same unit as ``value``).

    The interval is the range of the model's plausible parameters (see ``docs/prediction.md``), not a
    formal confidence interval; ``low <= value <= high`` always holds.
    """

    value: float
    low: float
    high: float

    def __post_init__(self) -> None:
        for x in (self.value, self.low, self.high):
            if not math.isfinite(x):
                raise ValueError(f"an estimate must be finite, got {self.value}, [{self.low}, {self.high}]")
        if not self.low <= self.value <= self.high:
            raise ValueError(f"estimate value {self.value} outside its interval [{self.low}, {self.high}]")

    @classmethod
    def spread(cls, value: float, *candidates: float) -> Estimate:
        """``value`` with the interval spanned by it and every candidate."""
        return cls(value=value, low=min(value, *candidates), high=max(value, *candidates))

    def scaled(self, factor: float) -> Estimate:
        """Every bound multiplied by a positive ``factor``."""
        if factor <= 0:
            raise ValueError("scale factor must be positive")
        return Estimate(self.value * factor, self.low * factor, self.high * factor)

    def widened(self, rel: float) -> Estimate:
        """The interval widened by at least ``rel`` (relative) on each side of the value."""
        return Estimate(self.value, min(self.low, self.value * (1 - rel)), max(self.high, self.value * (1 + rel)))
