"""TemperatureSchedule: the schedule starts where the rewind policy restarted it or where the early trigger fired,
whichever is later; a rewind takes a firing at a removed position with it, and the trigger follows the rewind."""

from __future__ import annotations

import torch

from perpetual_logits import EarlyTrigger, LinearDecay, RowState
from perpetual_logits.backstep.temperature import TemperatureSchedule

CPU = torch.device("cpu")
EOS = 2
SURE_EOS = torch.tensor([[0.0, 0.0, 30.0, 0.0]])  # the early trigger (window 1, threshold 0.5) fires on it
NO_EOS = torch.tensor([[0.0, 0.0, -30.0, 0.0]])


def made(early: EarlyTrigger | None = None) -> tuple[TemperatureSchedule, list[int | None]]:
    restarts: list[int | None] = [None]  # what the rewind policy records in schedule_from
    schedule = TemperatureSchedule(LinearDecay(2.0, 4), early, CPU, lambda: restarts)
    schedule.start(1, 3)
    return schedule, restarts


def factor(schedule: TemperatureSchedule, length: int) -> float:
    """The multiplier of row 0 for the position chosen when it holds ``length`` tokens."""
    schedule.set_factors([0], [length], 1)
    factors = schedule.processor.factors
    return 1.0 if factors is None else round(float(factors[0]), 4)


def test_is_a_row_state():
    assert isinstance(made()[0], RowState)


def test_the_schedule_runs_from_where_the_policy_restarted_it():
    schedule, restarts = made()
    assert factor(schedule, 5) == 1.0  # no restart yet
    restarts[0] = 5
    schedule.rewind(0, 5)
    assert [factor(schedule, n) for n in range(5, 11)] == [2.0, 1.75, 1.5, 1.25, 1.0, 1.0]


def test_an_early_firing_starts_it_and_the_later_start_wins():
    schedule, restarts = made(EarlyTrigger(window=1, eos_threshold=0.5))
    assert schedule.observe(NO_EOS, [0], [3], [EOS]) == 0
    assert schedule.observe(SURE_EOS, [0], [4], [EOS]) == 1  # fires while choosing position 4
    assert schedule.early_positions == [[1]]
    assert factor(schedule, 4) == 2.0
    restarts[0] = 2  # an older restart does not move the start back
    assert factor(schedule, 5) == 1.75
    restarts[0] = 5
    assert factor(schedule, 5) == 2.0


def test_a_rewind_before_the_firing_removes_that_start():
    schedule, restarts = made(EarlyTrigger(window=1, eos_threshold=0.5))
    restarts[0] = 4
    schedule.observe(SURE_EOS, [0], [6], [EOS])  # fired at position 6
    assert factor(schedule, 6) == 2.0
    schedule.rewind(0, 7)  # position 6 stays: so does the firing
    assert factor(schedule, 7) == 1.75
    schedule.rewind(0, 6)  # position 6 is chosen again: the firing is gone, the policy's restart at 4 counts
    assert factor(schedule, 6) == 1.5


def test_the_early_trigger_follows_the_rows_length():
    """Window 2: a rewind that removes one of the two observed steps leaves one step of history."""
    schedule, _ = made(EarlyTrigger(window=2, eos_threshold=0.5))
    assert schedule.observe(SURE_EOS, [0], [3], [EOS]) == 0  # position 3, one step of history
    schedule.rewind(0, 3)  # the row holds its prompt again: that step is gone
    assert schedule.observe(SURE_EOS, [0], [3], [EOS]) == 0  # one step again, not two
    assert schedule.observe(SURE_EOS, [0], [4], [EOS]) == 1
