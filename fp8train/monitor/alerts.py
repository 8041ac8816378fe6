"""When the monitor raises an alert: a layer's amax far above its own recent past, or FP8 overflow.

Two rules, both evaluated on the values of one monitored step:

- ``SpikeRule``: value > factor x the median of the same quantity over the last ``window`` monitored steps, once
  ``min_history`` of them exist. A median, not a mean or max, so one earlier spike does not raise the bar for the
  next one, and a slow steady drift (which delayed scaling follows) never fires: only sudden jumps do. A value that
  is not finite always fires.
- ``overflow``: an FP8 tensor had elements beyond its format's max (by more than the half ulp that rounding would
  absorb) at the scale actually used, and its amax was more than ``min_ratio`` x the amax that scale assumed; or it
  held an inf or NaN (alerted as ``non_finite``, as a non-finite h is: no overflow of the scale, a step gone bad).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass


@dataclass
class Alert:
    """One alert, as written in the ``alerts`` list of outliers.jsonl."""

    step: int
    layer: int
    tensor: str  # "h" (the SwiGLU down-projection input), or an FP8 tensor such as "mlp.down_proj.input"
    kind: str  # "amax_spike" | "fp8_overflow" | "non_finite"
    # amax_spike: the amax; fp8_overflow: amax_now / amax_assumed; non_finite: h's amax, or an FP8 tensor's ratio
    value: float
    reference: float  # amax_spike (h): the running median; FP8 tensors: the fraction of elements saturated
    message: str

    def to_json(self) -> dict:
        return asdict(self)


class SpikeRule:
    """value > factor x running median of the last ``window`` values of the same key (see the module docstring)."""

    def __init__(self, factor: float, window: int, min_history: int):
        self.factor, self.window, self.min_history = factor, window, min_history
        self.history: dict[str, deque[float]] = {}

    def median(self, key: str) -> float | None:
        """The running median of ``key``, or None while fewer than ``min_history`` values are known."""
        past = self.history.get(key, ())
        return statistics.median(past) if len(past) >= self.min_history else None

    def check(self, key: str, value: float) -> tuple[bool, float | None]:
        """(fires, median before this value), then remember the value. Non-finite values fire and are not kept."""
        median = self.median(key)
        if not math.isfinite(value):
            return True, median
        fires = median is not None and value > self.factor * median
        self.record(key, value)
        return fires, median

    def record(self, key: str, value: float) -> None:
        if math.isfinite(value):
            self.history.setdefault(key, deque(maxlen=self.window)).append(value)


def overflowed(stats: dict, min_ratio: float) -> bool:
    """FP8 elements were clamped this step (saturated_frac > 0), by more than ``min_ratio`` x the assumed amax; or
    the tensor met an inf or NaN (a NaN is never counted as saturated, but its amax_ratio is NaN)."""
    ratio = stats.get("amax_ratio", 0.0)
    return not math.isfinite(ratio) or (stats.get("saturated_frac", 0.0) > 0 and ratio > min_ratio)
