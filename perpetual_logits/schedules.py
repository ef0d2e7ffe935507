"""Temperature schedules: how hot sampling runs in the steps after a trigger.

A schedule maps *steps since the trigger* (``s = 0, 1, 2, ...``) to a temperature **multiplier**. The
multiplier scales whatever temperature ``generate()`` already uses, so the effective temperature is
``T_config * schedule(s)``.

``s = 0`` is the step of the trigger itself: the token that replaces the evicted EOS (Method 2) or the
first token regenerated after a rewind (Method 4). **Every schedule gives its full peak at ``s = 0``** and
returns exactly ``1.0`` from ``s = schedule.length`` on (``length`` is ``None`` for schedules that never
return to 1.0).

For Method 4 the blog's rule is "back to the default by the position where EOS was": after a rewind of
``n`` tokens the first regenerated token sits at ``s = 0`` and the position where EOS was sampled at
``s = n``, so ``LinearDecay(peak, n)`` reaches ``1.0`` exactly there.

Schedules are immutable, validated dataclasses and work as plain callables.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = [
    "Constant",
    "CosineDecay",
    "ExponentialDecay",
    "LinearDecay",
    "Schedule",
    "StepDecay",
]


def _check_peak(value: object, name: str = "peak") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a positive float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite float > 0, got {value!r}")
    return float(value)


def _check_steps(value: object, name: str = "steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return value


def _check_step_index(s: int) -> None:
    if s < 0:
        raise ValueError(f"steps since the trigger must be >= 0, got {s}")


class Schedule(ABC):
    """A temperature multiplier as a function of the steps since a trigger.

    Subclasses implement :meth:`factor`; :attr:`length` says from which step on the multiplier is 1.0.
    """

    peak: float

    @abstractmethod
    def factor(self, s: int) -> float:
        """The multiplier ``s`` steps after the trigger (``s >= 0``)."""

    @property
    @abstractmethod
    def length(self) -> int | None:
        """The first ``s`` from which the multiplier is exactly 1.0, or ``None`` if it never is."""

    def __call__(self, s: int) -> float:
        _check_step_index(s)
        length = self.length
        if length is not None and s >= length:
            return 1.0
        return self.factor(s)

    def is_active(self, s: int) -> bool:
        """Whether the multiplier at ``s`` differs from 1.0 (so callers can skip the work)."""
        length = self.length
        return length is None or s < length


@dataclass(frozen=True)
class LinearDecay(Schedule):
    """Straight line from ``peak`` at ``s = 0`` down (or up) to 1.0 at ``s = steps``.

    The blog's Method 4 rule with ``steps = n_remove``: back to the default temperature exactly at the
    position where EOS had been sampled.

    Args:
        peak (`float`): multiplier at the trigger step; must be > 0 (values < 1 cool instead of heat).
        steps (`int`): steps until the multiplier is back to 1.0; must be >= 1.

    Example:

    ```python
    >>> from perpetual_logits import LinearDecay
    >>> sched = LinearDecay(2.0, 4)
    >>> [sched(s) for s in range(6)]
    [2.0, 1.75, 1.5, 1.25, 1.0, 1.0]

    ```
    """

    peak: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak", _check_peak(self.peak))
        object.__setattr__(self, "steps", _check_steps(self.steps))

    def factor(self, s: int) -> float:
        return self.peak + (1.0 - self.peak) * s / self.steps

    @property
    def length(self) -> int:
        return self.steps


@dataclass(frozen=True)
class StepDecay(Schedule):
    """Subtract a fixed ``step`` per token from ``peak`` until 1.0: the reference code's ``-= 0.1``.

    The reference script subtracts 0.1 from the absolute temperature; here the subtraction applies to the
    multiplier, which is the same thing when the configured temperature is 1.0.

    Args:
        peak (`float`): multiplier at the trigger step; must be > 0.
        step (`float`, defaults to 0.1): amount removed per step; must be > 0.

    Example:

    ```python
    >>> from perpetual_logits import StepDecay
    >>> sched = StepDecay(1.3)
    >>> [round(sched(s), 6) for s in range(5)], sched.length
    ([1.3, 1.2, 1.1, 1.0, 1.0], 3)

    ```
    """

    peak: float
    step: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak", _check_peak(self.peak))
        object.__setattr__(self, "step", _check_peak(self.step, "step"))

    def factor(self, s: int) -> float:
        if self.peak >= 1.0:
            return max(1.0, self.peak - self.step * s)
        return min(1.0, self.peak + self.step * s)

    @property
    def length(self) -> int:
        # Round away float noise so that e.g. (2.0 - 1.0) / 0.1 gives 10 steps, not 11.
        return max(1, math.ceil(round(abs(self.peak - 1.0) / self.step, 9)))


@dataclass(frozen=True)
class CosineDecay(Schedule):
    """Half a cosine from ``peak`` at ``s = 0`` to 1.0 at ``s = steps``: slow start, slow landing.

    Args:
        peak (`float`): multiplier at the trigger step; must be > 0.
        steps (`int`): steps until the multiplier is back to 1.0; must be >= 1.

    Example:

    ```python
    >>> from perpetual_logits import CosineDecay
    >>> [round(CosineDecay(2.0, 2)(s), 6) for s in range(3)]
    [2.0, 1.5, 1.0]

    ```
    """

    peak: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak", _check_peak(self.peak))
        object.__setattr__(self, "steps", _check_steps(self.steps))

    def factor(self, s: int) -> float:
        return 1.0 + (self.peak - 1.0) * 0.5 * (1.0 + math.cos(math.pi * s / self.steps))

    @property
    def length(self) -> int:
        return self.steps


@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    """The excess over 1.0 shrinks by ``rate`` each step: ``1 + (peak - 1) * rate**s``.

    It is cut to exactly 1.0 once the excess is below ``tolerance``, so it always ends.

    Args:
        peak (`float`): multiplier at the trigger step; must be > 0.
        rate (`float`, defaults to 0.8): factor applied to the excess per step; in (0, 1).
        tolerance (`float`, defaults to 1e-3): excess below which the multiplier is 1.0; in (0, 1).

    Example:

    ```python
    >>> from perpetual_logits import ExponentialDecay
    >>> sched = ExponentialDecay(2.0, rate=0.5, tolerance=0.2)
    >>> [sched(s) for s in range(5)], sched.length
    ([2.0, 1.5, 1.25, 1.0, 1.0], 3)

    ```
    """

    peak: float
    rate: float = 0.8
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak", _check_peak(self.peak))
        for name in ("rate", "tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be a float in (0, 1), got {value!r}")
            object.__setattr__(self, name, float(value))

    def factor(self, s: int) -> float:
        return 1.0 + (self.peak - 1.0) * self.rate**s

    @property
    def length(self) -> int:
        excess = abs(self.peak - 1.0)
        if excess < self.tolerance:
            return 0 if excess == 0.0 else 1
        # Smallest s with excess * rate**s < tolerance.
        s = math.floor(math.log(self.tolerance / excess) / math.log(self.rate)) + 1
        while s > 0 and excess * self.rate ** (s - 1) < self.tolerance:
            s -= 1
        return max(1, s)


@dataclass(frozen=True)
class Constant(Schedule):
    """The same multiplier for ``steps`` steps after the trigger (forever when ``steps`` is None).

    Args:
        value (`float`): the multiplier; must be > 0.
        steps (`int`, *optional*): how many steps it lasts; ``None`` keeps it for the rest of the run.

    Example:

    ```python
    >>> from perpetual_logits import Constant
    >>> [Constant(1.5, steps=2)(s) for s in range(4)]
    [1.5, 1.5, 1.0, 1.0]

    ```
    """

    value: float
    steps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _check_peak(self.value, "value"))
        if self.steps is not None:
            object.__setattr__(self, "steps", _check_steps(self.steps))

    @property
    def peak(self) -> float:  # type: ignore[override]
        return self.value

    def factor(self, s: int) -> float:
        return self.value

    @property
    def length(self) -> int | None:
        return self.steps
