"""Schedules: values, the peak at s = 0, exact return to 1.0, validation, immutability."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perpetual_logits import Constant, CosineDecay, ExponentialDecay, LinearDecay, Schedule, StepDecay

peaks = st.floats(min_value=0.05, max_value=8.0, allow_nan=False).filter(lambda p: abs(p - 1.0) > 1e-6)
steps = st.integers(min_value=1, max_value=200)


def all_schedules(peak: float, n: int) -> list[Schedule]:
    return [
        LinearDecay(peak, n),
        StepDecay(peak, 0.1),
        CosineDecay(peak, n),
        ExponentialDecay(peak),
        Constant(peak, n),
    ]


@given(peaks, steps)
def test_first_step_after_trigger_is_the_full_peak(peak: float, n: int) -> None:
    for schedule in all_schedules(peak, n):
        assert schedule(0) == pytest.approx(peak)


@given(peaks, steps)
def test_every_finite_schedule_is_exactly_one_from_its_length_on(peak: float, n: int) -> None:
    for schedule in all_schedules(peak, n):
        length = schedule.length
        assert length is not None and length >= 1
        assert schedule(length) == 1.0
        assert schedule(length + 7) == 1.0
        assert not schedule.is_active(length)
        assert schedule.is_active(length - 1)


@given(peaks, steps)
def test_decays_move_monotonically_towards_one_and_never_cross_it(peak: float, n: int) -> None:
    for schedule in [
        LinearDecay(peak, n),
        StepDecay(peak, 0.1),
        CosineDecay(peak, n),
        ExponentialDecay(peak),
    ]:
        values = [schedule(s) for s in range((schedule.length or 0) + 2)]
        excess = [v - 1.0 for v in values]
        assert all(abs(b) <= abs(a) + 1e-12 for a, b in itertools.pairwise(excess))
        assert all(e * (peak - 1.0) >= -1e-12 for e in excess)  # same side of 1.0 as the peak


def test_linear_decay_reaches_default_at_the_eos_position() -> None:
    # Method 4: a rewind of n tokens puts the first regenerated token at s = 0, the EOS position at s = n.
    sched = LinearDecay(2.0, 10)
    assert [sched(s) for s in (0, 5, 9, 10)] == pytest.approx([2.0, 1.5, 1.1, 1.0])


def test_step_decay_is_the_reference_minus_point_one_per_step() -> None:
    sched = StepDecay(2.0)
    assert sched.length == 10
    assert [round(sched(s), 9) for s in range(12)] == [round(2.0 - 0.1 * s, 9) for s in range(10)] + [
        1.0,
        1.0,
    ]


def test_cosine_and_exponential_values() -> None:
    assert CosineDecay(3.0, 4)(2) == pytest.approx(2.0)
    exp = ExponentialDecay(2.0, rate=0.5, tolerance=0.01)
    assert exp(3) == pytest.approx(1.125)
    assert exp.length == 7  # 0.5**7 = 0.0078 < 0.01 <= 0.5**6


def test_constant_forever_and_bounded() -> None:
    assert Constant(1.5)(10_000) == 1.5 and Constant(1.5).length is None
    assert Constant(1.5, steps=3)(3) == 1.0


def test_peak_below_one_cools() -> None:
    assert LinearDecay(0.5, 2)(1) == pytest.approx(0.75)
    assert StepDecay(0.8, 0.1)(1) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: LinearDecay(0.0, 3), "peak"),
        (lambda: LinearDecay(-1.0, 3), "peak"),
        (lambda: LinearDecay(float("nan"), 3), "peak"),
        (lambda: LinearDecay(2.0, 0), "steps"),
        (lambda: LinearDecay(2.0, 2.5), "steps"),
        (lambda: LinearDecay("2", 3), "peak"),
        (lambda: StepDecay(2.0, 0.0), "step"),
        (lambda: CosineDecay(2.0, -1), "steps"),
        (lambda: ExponentialDecay(2.0, rate=1.0), "rate"),
        (lambda: ExponentialDecay(2.0, tolerance=0.0), "tolerance"),
        (lambda: Constant(0.0), "value"),
        (lambda: Constant(2.0, steps=0), "steps"),
        (lambda: LinearDecay(True, 3), "peak"),
    ],
)
def test_invalid_arguments_name_the_argument(build, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        build()


def test_negative_step_index_is_rejected() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        LinearDecay(2.0, 3)(-1)


def test_schedules_are_immutable_with_readable_repr() -> None:
    sched = LinearDecay(2, 5)
    assert repr(sched) == "LinearDecay(peak=2.0, steps=5)"
    assert isinstance(sched.peak, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.peak = 3.0  # type: ignore[misc]
    assert sched == LinearDecay(2.0, 5) and hash(sched) == hash(LinearDecay(2.0, 5))
    assert math.isclose(StepDecay(1.3).length, 3)
