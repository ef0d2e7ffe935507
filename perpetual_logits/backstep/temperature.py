"""Method 4's per-row temperature: a schedule restarted by each rewind (or early, by an ``EarlyTrigger``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .._moved import moved_names
from ..processor_list import take_over_truncation
from ..protocol import RowState
from ..schedules import Schedule, factor_table, multipliers
from ..triggers import EarlyTrigger
from ..truncation import RowTruncation, TruncationSchedule, Widening

if not TYPE_CHECKING:  # names that moved to the processor-list module, for one release
    __getattr__ = moved_names(__name__, "perpetual_logits.processor_list", {"WARPERS", "insert_before_warpers"})

__all__ = ["RowTemperature", "TemperatureSchedule"]


class RowTemperature(LogitsProcessor):
    """Divides each row's scores by its own multiplier; :class:`TemperatureSchedule` sets :attr:`factors`."""

    def __init__(self) -> None:
        self.factors: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.factors is None:
            return scores
        return scores / self.factors.to(scores.dtype)[:, None]  # type: ignore[return-value]


class TemperatureSchedule(RowState):
    """Per row: where the schedule last started, and the multiplier for the position being chosen.

    The schedule starts at a rewind (where the rewind policy says: ``restarts``) or where the early trigger fires,
    whichever is later; a rewind that removes the position where the trigger fired removes that start with it.

    With ``widen``, the same restarts also widen each row's top-k / top-p / min-p, back to the configured values
    on the schedule (:meth:`widen_truncation` hands the loop the per-row processor that replaces the warpers).

    Args:
        schedule: multiplier by steps since the start (Method 4: ``LinearDecay(2.0, n_remove)``).
        early_trigger: starts the schedule before EOS is sampled; copied, so concurrent calls do not share it.
        device: where the multipliers are made.
        restarts: returns, per row, the length at which a rewind last restarted the schedule (``None``: never):
            the rewind policy's ``schedule_from``, which owns those restarts.
        widen: wider truncation after a restart.
    """

    def __init__(
        self,
        schedule: Schedule,
        early_trigger: EarlyTrigger | None,
        device: torch.device,
        restarts: Callable[[], Sequence[int | None]],
        widen: Widening | None = None,
    ) -> None:
        # -- settings
        self.schedule = schedule
        self.table = factor_table(schedule)
        self.forever = schedule.length is None
        self.device = device
        self.restarts = restarts
        # -- the early trigger, a unit of its own (it follows rewinds), and where it last fired per row
        self.early = copy.deepcopy(early_trigger) if early_trigger is not None else None
        self.fired_at: list[int | None] = []
        self.early_positions: list[list[int]] = []  # per row, the generated index of every firing (the output)
        self.prompt_length = 0
        # -- what the loop's processors apply: the multiplier, and with `widen` the per-row truncation
        self.processor = RowTemperature()
        self.widen = widen
        self.truncation: RowTruncation | None = None
        self.truncation_plan: TruncationSchedule | None = None
        self.vocab_size = 0

    def widen_truncation(self, processors: LogitsProcessorList, vocab_size: int) -> LogitsProcessorList:
        """``processors`` with their top-k/top-p/min-p warpers replaced by one per-row processor (with
        ``widen``; otherwise unchanged)."""
        if self.widen is None:
            return processors
        processors, self.truncation = take_over_truncation(processors)
        self.truncation_plan = TruncationSchedule(self.truncation.configured, self.widen, self.schedule)
        self.vocab_size = vocab_size
        return processors

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int) -> None:
        self.fired_at = [None] * batch_size
        self.early_positions = [[] for _ in range(batch_size)]
        self.prompt_length = prompt_length
        if self.early is not None:
            self.early.start(batch_size, prompt_length, self.device)

    def rewind(self, row: int, length: int) -> None:
        if self.early is not None:
            self.early.rewind(row, length)
        fired = self.fired_at[row]
        if fired is not None and fired >= length:  # the position it fired at is chosen again
            self.fired_at[row] = None

    # -- steps ---------------------------------------------------------------------------------------------
    def observe(self, logits: torch.Tensor, rows: list[int], lens: list[int], eos: list[int]) -> int:
        """Feed the early trigger this step's raw distributions; start the schedule of rows that fire.
        Returns how many fired."""
        if self.early is None:
            return 0
        fired = self.early.update_from_scores(logits, eos).tolist()
        count = 0
        for b in rows:
            if fired[b]:
                self.fired_at[b] = lens[b]
                self.early_positions[b].append(lens[b] - self.prompt_length)
                count += 1
        return count

    def started_at(self, row: int) -> int | None:
        """Where the row's schedule last started (a length, prompt included), or ``None``."""
        return _later(self.restarts()[row], self.fired_at[row])

    def set_factors(self, rows: list[int], lens: list[int], batch: int) -> None:
        """Set the multiplier of every row for the position it chooses now (1.0 when none applies)."""
        steps, on = [0] * batch, [False] * batch
        restarts = self.restarts()
        for b in rows:
            start = _later(restarts[b], self.fired_at[b])
            if start is not None and self.schedule.is_active(lens[b] - start):
                steps[b], on[b] = lens[b] - start, True
        if not any(on):
            self.processor.factors = None
            if self.truncation is not None:
                self.truncation.set_rows()
            return
        steps_t, on_t = torch.tensor(steps, device=self.device), torch.tensor(on, device=self.device)
        self.processor.factors = multipliers(self.table, steps_t, on_t, forever=self.forever)
        if self.truncation is not None and self.truncation_plan is not None:
            self.truncation.set_rows(*self.truncation_plan.row_values(steps_t, on_t, self.vocab_size))


def _later(restarted: int | None, fired: int | None) -> int | None:
    """The later of two starts (a rewind's restart, an early firing); ``None`` when neither happened."""
    if restarted is None or fired is None:
        return fired if restarted is None else restarted
    return max(restarted, fired)
