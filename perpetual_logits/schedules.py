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

Schedules are immutable, validated dataclasses and work as plain callables. Each one is a formula: a value
at any ``s`` costs the same, for one step (:meth:`Schedule.__call__`) or a tensor of steps
(:meth:`Schedule.factors`), and nothing is built step by step. Arguments are bounded (multipliers in
``[MIN_MULTIPLIER, MAX_MULTIPLIER]``, at most ``MAX_STEPS`` steps) so that no schedule overflows a float or
takes a length no generation could reach.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from . import _validation

__all__ = [
    "MAX_MULTIPLIER",
    "MIN_MULTIPLIER",
    "Constant",
    "CosineDecay",
    "ExponentialDecay",
    "FactorTable",
    "LinearDecay",
    "Schedule",
    "StepDecay",
    "factor_table",
    "multipliers",
]

#: Bounds of any multiplier: beyond them logits divided by the multiplier overflow float32 or the
#: distribution is a point mass / uniform to float precision anyway.
MIN_MULTIPLIER = 1e-3
MAX_MULTIPLIER = 1e3
MAX_STEPS = _validation.MAX_STEPS


def _check_peak(value: object, name: str = "peak") -> float:
    peak = _validation.positive_float(value, name, maximum=MAX_MULTIPLIER)
    if peak < MIN_MULTIPLIER:
        raise ValueError(f"`{name}` must be a multiplier in [{MIN_MULTIPLIER:g}, {MAX_MULTIPLIER:g}], got {value!r}")
    return peak


def _check_steps(value: object, name: str = "steps") -> int:
    return _validation.positive_int(value, name, maximum=MAX_STEPS)


def _check_step_index(s: int) -> None:
    if s < 0:
        raise ValueError(f"steps since the trigger must be >= 0, got {s}")


class Schedule(ABC):
    """A temperature multiplier as a function of the steps since a trigger.

    Subclasses implement :meth:`factor` (one step, Python float) and :meth:`_formula` (a tensor of steps,
    the same closed form); :attr:`length` says from which step on the multiplier is 1.0.
    """

    peak: float

    @abstractmethod
    def factor(self, s: int) -> float:
        """The multiplier ``s`` steps after the trigger (``0 <= s < length``)."""

    @abstractmethod
    def _formula(self, s: torch.Tensor) -> torch.Tensor:
        """:meth:`factor` over a float64 tensor of steps in ``[0, length)``."""

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

    def factors(self, s: torch.Tensor) -> torch.Tensor:
        """The multipliers at a tensor of steps (any shape, ``>= 0``), float32, computed in closed form.

        Example:

        ```python
        >>> import torch
        >>> from perpetual_logits import LinearDecay
        >>> LinearDecay(2.0, 4).factors(torch.tensor([0, 2, 4, 10**9]))
        tensor([2.0000, 1.5000, 1.0000, 1.0000])

        ```
        """
        steps = s.to(torch.float64).clamp_min(0.0)
        length = self.length
        values = self._formula(steps if length is None else steps.clamp_max(max(length - 1, 0)))
        if length is not None:
            values = torch.where(steps < length, values, torch.ones_like(values))
        return values.to(torch.float32)

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

    def _formula(self, s: torch.Tensor) -> torch.Tensor:
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
        object.__setattr__(self, "step", _validation.positive_float(self.step, "step", maximum=MAX_MULTIPLIER))
        # The length is a closed form too; refuse a step so small that the schedule would outlast any run.
        if abs(self.peak - 1.0) / self.step > MAX_STEPS:
            raise ValueError(
                f"`step` {self.step!r} is too small: from peak {self.peak} the schedule would last more than "
                f"{MAX_STEPS} steps"
            )

    def factor(self, s: int) -> float:
        if self.peak >= 1.0:
            return max(1.0, self.peak - self.step * s)
        return min(1.0, self.peak + self.step * s)

    def _formula(self, s: torch.Tensor) -> torch.Tensor:
        if self.peak >= 1.0:
            return (self.peak - self.step * s).clamp_min(1.0)
        return (self.peak + self.step * s).clamp_max(1.0)

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

    def _formula(self, s: torch.Tensor) -> torch.Tensor:
        return 1.0 + (self.peak - 1.0) * 0.5 * (1.0 + torch.cos(math.pi * s / self.steps))

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
            object.__setattr__(self, name, _validation.open_unit_interval(getattr(self, name), name))
        object.__setattr__(self, "_length", self._closed_form_length())

    def _closed_form_length(self) -> int:
        excess = abs(self.peak - 1.0)
        if excess < self.tolerance:
            return 0 if excess == 0.0 else 1
        # Smallest s with excess * rate**s < tolerance: s > log(tolerance / excess) / log(rate).
        estimate = math.log(self.tolerance / excess) / math.log(self.rate)
        if estimate > MAX_STEPS:
            raise ValueError(
                f"`rate` {self.rate!r} is too close to 1 for `tolerance` {self.tolerance!r}: the schedule would "
                f"last more than {MAX_STEPS} steps"
            )
        s = math.floor(estimate) + 1
        # The float estimate can be off by one either way; settle it on the exact condition.
        if s > 1 and excess * self.rate ** (s - 1) < self.tolerance:
            s -= 1
        elif excess * self.rate**s >= self.tolerance:
            s += 1
        return max(1, s)

    def factor(self, s: int) -> float:
        return 1.0 + (self.peak - 1.0) * self.rate**s

    def _formula(self, s: torch.Tensor) -> torch.Tensor:
        return 1.0 + (self.peak - 1.0) * torch.pow(self.rate, s)

    @property
    def length(self) -> int:
        return self._length  # type: ignore[attr-defined]


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

    def _formula(self, s: torch.Tensor) -> torch.Tensor:
        return torch.full_like(s, self.value)

    @property
    def length(self) -> int | None:
        return self.steps


#: Steps kept in a :class:`FactorTable`'s lookup tensor; later steps of a longer schedule use the formula.
TABLE_STEPS = 4096


class FactorTable:
    """A schedule's multipliers ready for per-step lookups on a device: one index per step.

    The first ``min(length, TABLE_STEPS)`` values are computed at once from the closed form
    (:meth:`Schedule.factors`) and end with 1.0; a longer schedule falls back to the formula past the table,
    so a table never grows with the schedule's length.

    Args:
        schedule (`Schedule`): the schedule to tabulate.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.schedules import FactorTable, LinearDecay
    >>> table = FactorTable(LinearDecay(2.0, 2))
    >>> table.lookup(torch.tensor([0, 1, 5]), torch.tensor([True, True, False]))
    tensor([2.0000, 1.5000, 1.0000])

    ```
    """

    def __init__(self, schedule: Schedule) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(
                f"`schedule` must be a perpetual_logits Schedule (LinearDecay, StepDecay, ...), got {schedule!r}"
            )
        self.schedule = schedule
        length = schedule.length
        self.forever = length is None
        if length is None:  # a constant that never ends: its value, then 1.0 for rows not started
            self.values = torch.tensor([schedule.factor(0), 1.0], dtype=torch.float32)
            self.exact = True
        else:
            n = min(length, TABLE_STEPS)
            self.values = torch.cat([schedule.factors(torch.arange(n)), torch.ones(1)])
            self.exact = length <= TABLE_STEPS  # every active step is in the table
        self._by_device: dict[torch.device, torch.Tensor] = {self.values.device: self.values}

    def on(self, device: torch.device) -> torch.Tensor:
        """The lookup tensor on ``device`` (copied once per device)."""
        values = self._by_device.get(device)
        if values is None:
            values = self._by_device[device] = self.values.to(device)
        return values

    def lookup(self, steps_since: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Multipliers (float32) for ``steps_since`` (long, ``>= 0``); 1.0 where ``active`` is False."""
        device = steps_since.device
        values = self.on(device)
        last = values.shape[0] - 1
        if self.forever:
            index = torch.zeros_like(steps_since) if active is None else (~active).long()
            return values[index]
        if self.exact:
            index = steps_since.clamp(0, last)
            if active is not None:
                index = index.masked_fill(~active, last)
            return values[index]
        out = self.schedule.factors(steps_since).to(device)
        return out if active is None else torch.where(active, out, torch.ones((), device=device))


def factor_table(schedule: Schedule) -> FactorTable:
    """The :class:`FactorTable` of ``schedule`` (built from its closed form, bounded in size)."""
    return FactorTable(schedule)


def multipliers(
    table: FactorTable, steps_since: torch.Tensor | int, active: torch.Tensor, forever: bool = False
) -> torch.Tensor:
    """Vectorised schedule lookup: the multiplier at ``steps_since`` where ``active``, else 1.0.

    ``forever`` is kept for callers of the earlier tensor-table form; the table knows whether its schedule
    ends.
    """
    s = torch.as_tensor(steps_since, device=active.device)
    return table.lookup(s.expand_as(active) if s.dim() == 0 else s, active)
