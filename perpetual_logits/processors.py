"""Methods 1 and 2 as drop-in ``LogitsProcessor``s: ``model.generate(logits_processor=[...])``.

Where they run: transformers 5 runs user processors after the config processors (repetition penalty,
``min_new_tokens``, ...) and **before** the sampling warpers (temperature, top-k, top-p, min-p). So these
processors see, and act on, the distribution *before* temperature and truncation:

* masking EOS here removes it before top-k, so with ``top_k=50`` the 51st token survives instead;
  "draw two tokens without replacement and keep the second when the first is EOS" is exactly equivalent
  to masking EOS on the distribution the processor sees (``P(t) = p_t / (1 - p_eos)``);
* a temperature multiplier applied here composes with the configured one: ``T_effective = T_config * m``;
* a probability measured here (EOS probability, a trigger) is measured before temperature and truncation.

State: both processors keep per-row records. They start clean on every new ``generate()`` call. A call
continues the previous one only when its ``input_ids`` are the previous call's ``input_ids`` plus one token
per row (same batch, same prefix, compared token by token); anything else starts a new generation. Only a
new call whose prompt is the previous call's *output* (its last ``input_ids`` plus the token sampled from
them) is indistinguishable from one more step; call :meth:`reset` before such a call (``make_perpetual``
models do it for you). Inside backstep generation the loop calls :meth:`start` and :meth:`rewind` so that
the state follows a rewind.

Cost: arguments are checked once per generation (the first call), not per step, and the per-step work is
a handful of tensor operations: records are copied into a buffer allocated once and summarised 64 steps at a
time, and transformers' per-step look at ``__call__``'s signature finds it precomputed. On an accelerator no
step synchronises with the host; on the CPU, where reading a value back is free, the common case (no row
whose only finite score is EOS; for Method 2, no row in its schedule) skips the kernels it does not need.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from . import _validation
from .distributions import eos_on_top, eos_probability, may_hold_lone_eos, restore_lone_eos
from .protocol import PerCallState, RowState
from .schedules import FactorTable, LinearDecay, Schedule, factor_table, multipliers
from .triggers import EarlyTrigger
from .truncation import Truncation, TruncationSchedule, Widening, truncate_rows

__all__ = [
    "EOSLogitsProcessor",
    "PostEOSResamplingLogitsProcessor",
    "SuppressEOSLogitsProcessor",
    "eos_probability",
    "factor_table",
    "multipliers",
]


@dataclass
class _StepRecord:
    positions: int | torch.Tensor  # int when every row chose the same position, else (batch,) long
    values: dict[str, torch.Tensor]  # name -> (batch,), or name -> (steps, batch) of a chunk (see `index`)
    index: int | None = None  # the step's index in a chunk of deferred statistics; None: `values` is its own

    def value(self, name: str, row: int) -> float:
        values = self.values[name]
        return float(values[row] if self.index is None else values[self.index, row])


#: Scores (elements) kept for deferred statistics before they are computed in one go: 8 Mi floats, 32 MiB.
_PENDING_ELEMENTS = 1 << 23
_PENDING_STEPS = 64


class EOSLogitsProcessor(LogitsProcessor, RowState, PerCallState):
    """Base class: validates EOS ids and shapes, keeps a per-row position clock and per-step records.

    Subclasses implement :meth:`process`. The clock says which sequence position (prompt included) each
    row is choosing a token for; records are keyed to it, so after a rewind the records of removed
    positions disappear from the per-row views.
    """

    def __init__(self, eos_token_id: int | list[int] | tuple[int, ...] | torch.Tensor) -> None:
        self.eos_token_id: tuple[int, ...] = _validation.eos_ids(eos_token_id)
        self._eos_by_device: dict[torch.device, torch.Tensor] = {}
        self.reset()

    # -- state -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: the next call starts a new generation."""
        self._batch: int | None = None
        self._prompt_length: int | None = None
        self._expected_width: int | None = None
        self._next_positions: torch.Tensor | None = None  # set once rows move independently (rewinds)
        self._last_ids: torch.Tensor | None = None  # the previous call's input_ids: is a call a continuation?
        self._scores_shape: torch.Size | None = None
        self._checked = False  # arguments are validated on the first call of a generation only
        self._records: list[_StepRecord] = []
        self._ended: dict[int, int] = {}  # row -> its final length, for rows the backstep loop finished
        # Deferred statistics: the records of recent steps and their scores, copied into one reused chunk
        # buffer (steps, batch, vocab) and computed a chunk at a time (see _record_scores).
        self._pending: list[_StepRecord] = []
        self._chunk: torch.Tensor | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        """Subclass hook: clear subclass state (called by :meth:`reset`)."""

    def _start_state(self, batch_size: int, prompt_length: int, device: torch.device | None) -> None:
        """Subclass hook: create the per-row state of a new generation, once, before its first step (``device``:
        that of the scores, or ``None`` when :meth:`start` runs before any: the CPU, moved at the first step)."""

    def rewind(self, row: int, length: int) -> None:
        """Row ``row`` was cut back to ``length`` tokens (prompt included); its next call chooses that position.

        The backstep loop calls this; it also fixes a row's clock at the start of a generation.
        """
        if self._batch is None or self._expected_width is None:
            raise RuntimeError("rewind() called before the processor saw any scores")
        if self._next_positions is None:
            self._next_positions = torch.full((self._batch,), self._expected_width, dtype=torch.long)
        dropped = int(self._next_positions[row]) - length  # calls made for positions >= length
        self._next_positions[row] = length
        self._ended.pop(row, None)
        self._rewind_state(row, length, dropped)

    def finish(self, row: int) -> None:
        """Row ``row`` is done (the backstep loop calls this): later calls still see the row, but its records
        stop at its final token."""
        if self._next_positions is not None:
            self._ended[row] = int(self._next_positions[row])

    def _rewind_state(self, row: int, length: int, dropped: int) -> None:
        """Subclass hook: drop state that belongs to positions >= ``length`` of ``row`` (``dropped`` calls)."""

    def start(self, batch_size: int, prompt_length: int) -> None:
        """Begin a generation whose rows will be moved by :meth:`rewind` (the backstep loop calls this)."""
        self.reset()
        self._batch = batch_size
        self._prompt_length = prompt_length
        self._expected_width = prompt_length
        self._next_positions = torch.full((batch_size,), prompt_length, dtype=torch.long)
        self._start_state(batch_size, prompt_length, None)

    # -- call --------------------------------------------------------------------------------------------
    def _eos(self, device: torch.device) -> torch.Tensor:
        eos = self._eos_by_device.get(device)
        if eos is None:
            eos = torch.tensor(self.eos_token_id, dtype=torch.long, device=device)
            self._eos_by_device[device] = eos
        return eos

    def _continues(self, input_ids: torch.Tensor, scores: torch.Tensor) -> bool:
        """Whether this call is the next step of the previous one: the same rows grown by one token."""
        last = self._last_ids
        if last is None or not isinstance(input_ids, torch.Tensor) or not isinstance(scores, torch.Tensor):
            return False
        if input_ids.dim() != 2 or input_ids.shape[0] != last.shape[0] or input_ids.shape[1] != last.shape[1] + 1:
            return False
        if scores.shape != self._scores_shape or input_ids.device != last.device:
            return False
        # generate() builds a new input_ids tensor per step, so this compares the prefix the model has seen;
        # a new prompt that merely has the expected length starts a new generation.
        return last.data_ptr() == input_ids.data_ptr() or torch.equal(input_ids[:, :-1], last)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._next_positions is None:
            if not self._continues(input_ids, scores):
                _validation.check_scores(input_ids, scores, self.eos_token_id)
                self.reset()  # a new generate() call
                self._batch, self._prompt_length = input_ids.shape[0], input_ids.shape[1]
                self._scores_shape = scores.shape
                self._start_state(input_ids.shape[0], input_ids.shape[1], scores.device)
            self._last_ids = input_ids
            positions: int | torch.Tensor = input_ids.shape[1]
        else:  # driven by start()/rewind(): the backstep loop says which position each row chooses
            if not self._checked:
                _validation.check_scores(input_ids, scores, self.eos_token_id)
                self._checked = True
            positions = self._next_positions.clone()
            self._next_positions += 1
        self._expected_width = input_ids.shape[1] + 1
        out = self.process(input_ids, scores, self._eos(scores.device), positions)
        return out if out.dtype == scores.dtype else out.to(scores.dtype)  # type: ignore[return-value]

    def process(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        eos: torch.Tensor,
        positions: int | torch.Tensor,
    ) -> torch.Tensor:
        """Return new scores. ``positions``: the position each row chooses (int when all rows agree)."""
        raise NotImplementedError

    # -- records -----------------------------------------------------------------------------------------
    def _record(self, positions: int | torch.Tensor, **values: torch.Tensor) -> None:
        # generate() runs under no_grad, so the values carry no graph; keep them as they are (no copies).
        self._records.append(_StepRecord(positions, values))

    def _record_scores(self, positions: int | torch.Tensor, scores: torch.Tensor) -> None:
        """Record statistics of ``scores`` later: :meth:`_statistics` runs once over a chunk of steps.

        Per step this costs one copy into a buffer allocated once per generation, instead of a handful of small
        kernels (and their dispatch) or an allocation, which is most of a processor's price on a small model;
        the chunk is bounded (64 steps, 32 MiB of scores).
        """
        chunk = self._chunk
        if (
            chunk is None
            or chunk.shape[1:] != scores.shape
            or chunk.dtype != scores.dtype
            or chunk.device != (scores.device)
        ):
            self._flush()
            steps = max(1, min(_PENDING_STEPS, _PENDING_ELEMENTS // max(scores.numel(), 1)))
            chunk = self._chunk = torch.empty((steps, *scores.shape), dtype=scores.dtype, device=scores.device)
        record = _StepRecord(positions, {}, index=len(self._pending))
        chunk[record.index].copy_(scores)
        self._records.append(record)
        self._pending.append(record)
        if len(self._pending) == chunk.shape[0]:
            self._flush()

    def _statistics(self, scores: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Subclass hook for :meth:`_record_scores`: (steps, batch, vocab) scores -> name -> (steps, batch)."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Compute the pending steps' statistics (all at once) and store them in their records."""
        pending, self._pending = self._pending, []
        if not pending or self._chunk is None:
            return
        stats = self._statistics(self._chunk[: len(pending)], self._eos(self._chunk.device))
        # The records share the chunk's statistics (a view per record and name would cost more than the step).
        for record in pending:
            record.values = stats

    def _row_history(self, row: int, name: str) -> list[tuple[int, float]]:
        """(position, value) of one row, in order, keeping only the latest record of each kept position."""
        if self._pending:
            self._flush()
        kept: list[tuple[int, float]] = []
        end = self._ended.get(row)
        for record in self._records:
            pos = record.positions if isinstance(record.positions, int) else int(record.positions[row])
            if end is not None and pos >= end:
                continue
            while kept and kept[-1][0] >= pos:  # a rewind: this position is being chosen again
                kept.pop()
            kept.append((pos, record.value(name, row)))
        return kept

    def _per_row(self, name: str) -> list[list[tuple[int, float]]]:
        """(generated step, value) per row, with the records of rewound positions dropped."""
        if self._batch is None or self._prompt_length is None:
            return []
        offset = self._prompt_length
        return [[(pos - offset, v) for pos, v in self._row_history(row, name)] for row in range(self._batch)]


# transformers' LogitsProcessorList rebuilds every processor's __call__ signature at every step (to see whether
# it takes extra arguments); a signature stored on the function is read back instead, a third of that price.
setattr(EOSLogitsProcessor.__call__, "__signature__", inspect.signature(EOSLogitsProcessor.__call__))  # noqa: B010


class SuppressEOSLogitsProcessor(EOSLogitsProcessor):
    r"""Method 1: EOS is never produced.

    Masking the EOS ids gives exactly the distribution of the blog's rule "draw two tokens without
    replacement, take the second when the first is EOS": ``P(t) = p_t / (1 - p_eos)`` for every non-EOS
    token, and greedy decoding picks the best non-EOS token. This holds on the distribution the processor
    sees, i.e. before temperature/top-k/top-p (see the module notes).

    A row in which only EOS ids have a finite score (another processor banned every other token) is left
    unchanged, so it emits EOS instead of NaN.

    It records, per row and step, the EOS probability and whether EOS was the top choice
    (:attr:`eos_probabilities`, :attr:`eos_top_steps`; steps count generated tokens from 0).

    Args:
        eos_token_id (`int` or `list[int]`): the id(s) that end generation.
        record (`bool`, defaults to `True`): keep the per-step records (a copy of the scores per step; the
            statistics are computed 64 steps at a time).

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits import SuppressEOSLogitsProcessor
    >>> proc = SuppressEOSLogitsProcessor(eos_token_id=2)
    >>> scores = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    >>> proc(torch.tensor([[1, 3]]), scores)
    tensor([[0., 1., -inf, 2.]])
    >>> round(proc.eos_probabilities[0][0], 2), proc.eos_top_steps
    (0.93, [[0]])

    ```
    """

    def __init__(self, eos_token_id: int | list[int] | tuple[int, ...] | torch.Tensor, record: bool = True):
        if not isinstance(record, bool):
            raise ValueError(f"`record` must be a bool, got {record!r}")
        self.record = record
        super().__init__(eos_token_id)

    def process(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        eos: torch.Tensor,
        positions: int | torch.Tensor,
    ) -> torch.Tensor:
        if self.record:
            self._record_scores(positions, scores)
        out = scores.index_fill(-1, eos, float("-inf"))  # a copy: the caller's scores stay as they were
        if not may_hold_lone_eos(out):
            return out
        return restore_lone_eos(out, eos, scores.index_select(-1, eos), out.amax(-1, keepdim=True))

    def _statistics(self, scores: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"eos_prob": eos_probability(scores, eos), "eos_top": eos_on_top(scores, eos)}

    @property
    def eos_probabilities(self) -> list[list[float]]:
        """Per row, the EOS probability at every generated step (before temperature/top-k/top-p)."""
        return [[v for _, v in row] for row in self._per_row("eos_prob")] if self.record else []

    @property
    def eos_top_steps(self) -> list[list[int]]:
        """Per row, the generated steps at which EOS was the highest-scoring token."""
        return [[s for s, v in row if v] for row in self._per_row("eos_top")] if self.record else []


_TRIGGERS = ("sample", "argmax")


class PostEOSResamplingLogitsProcessor(EOSLogitsProcessor):
    r"""Method 2: evict EOS and sample hotter for a while.

    EOS is suppressed as in :class:`SuppressEOSLogitsProcessor`. In addition, whenever EOS "would have been
    chosen" (an *eviction*, decided by ``trigger``), that row's temperature multiplier restarts at the
    schedule's peak and follows it back to 1.0. The token that replaces the evicted EOS is already drawn at
    the full peak (schedule step 0). The multiplier divides the scores, so it composes with ``generate()``'s
    own temperature: ``T_effective = T_config * multiplier``.

    Triggers:

    * ``"sample"`` (default, the blog's rule): an eviction happens with the probability EOS has in the scores
      this processor sees, drawn from torch's default generator (``torch.manual_seed`` reproduces runs);
    * ``"argmax"``: EOS is the highest-scoring token. Deterministic; the right choice for greedy decoding;
    * a float ``t`` in (0, 1]: EOS probability ``>= t``.

    Widening top-k / top-p / min-p after an eviction (the blog's "higher thresholds"): pass ``widen=`` and the
    truncation you sample with as ``truncation=``. The processor then applies top-k, top-p and min-p itself,
    per row: the configured values for rows without an eviction, the widened ones from an eviction on, back to
    the configured ones as the schedule returns to 1.0 (see :mod:`perpetual_logits.truncation`). The kept set is
    computed at the effective temperature ``truncation.temperature * multiplier``, as transformers' warpers
    would compute it after its temperature. ``generate()`` must then not truncate a second time: call it with
    ``**processor.generate_kwargs()`` (``top_k=0, top_p=1.0, min_p=None`` and the stated temperature); a
    ``make_perpetual`` model can check this, a plain ``generate()`` cannot.

    Args:
        eos_token_id (`int` or `list[int]`): the id(s) that end generation.
        schedule (`Schedule`, defaults to `LinearDecay(2.0, 10)`): multiplier per step since the eviction.
        trigger (`str` or `float`, defaults to `"sample"`): when an eviction happens, see above.
        early_trigger (`EarlyTrigger`, *optional*): also restart the schedule *before* EOS is chosen, when a
            row's EOS probability averaged over a window, or its entropy trend, says an ending is near (the
            statistics of the scores this processor sees). See :class:`~perpetual_logits.EarlyTrigger`.
        widen (`Widening`, *optional*): top-k / top-p / min-p at an eviction; they return to ``truncation`` with
            ``widen.schedule`` (default: ``schedule``). Requires ``truncation``.
        truncation (`Truncation`, *optional*): the top-k / top-p / min-p / temperature you sample with; only
            with ``widen`` (then the processor owns truncation, see above).

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits import PostEOSResamplingLogitsProcessor, LinearDecay
    >>> proc = PostEOSResamplingLogitsProcessor(2, schedule=LinearDecay(2.0, 2), trigger="argmax")
    >>> ids = torch.tensor([[1, 3]])
    >>> proc(ids, torch.tensor([[0.0, 1.0, 5.0, 2.0]]))   # EOS on top: evicted, scores halved
    tensor([[0.0000, 0.5000, -inf, 1.0000]])
    >>> proc(torch.tensor([[1, 3, 3]]), torch.tensor([[0.0, 1.0, 0.0, 3.0]]))   # one step later: 1.5x
    tensor([[0.0000, 0.6667, -inf, 2.0000]])
    >>> proc.evictions
    [[0]]

    ```
    """

    def __init__(
        self,
        eos_token_id: int | list[int] | tuple[int, ...] | torch.Tensor,
        schedule: Schedule | None = None,
        trigger: str | float = "sample",
        early_trigger: EarlyTrigger | None = None,
        widen: Widening | None = None,
        truncation: Truncation | None = None,
    ) -> None:
        if early_trigger is not None and not isinstance(early_trigger, EarlyTrigger):
            raise ValueError(f"`early_trigger` must be None or an EarlyTrigger, got {early_trigger!r}")
        self.early_trigger = early_trigger
        if schedule is None:
            schedule = LinearDecay(2.0, 10)
        if not isinstance(schedule, Schedule):
            raise ValueError(
                f"`schedule` must be a perpetual_logits Schedule (LinearDecay, StepDecay, ...), got {schedule!r}"
            )
        if isinstance(trigger, str):
            if trigger not in _TRIGGERS:
                raise ValueError(
                    f"`trigger` must be 'sample', 'argmax' or a float threshold in (0, 1], got {trigger!r}"
                )
        else:
            trigger = _validation.probability(trigger, "trigger")
        self.schedule = schedule
        self.trigger = trigger
        self._table: FactorTable = factor_table(schedule)
        self.widen, self.truncation = widen, truncation
        self._truncation_plan: TruncationSchedule | None = None
        if widen is not None or truncation is not None:
            if not isinstance(truncation, Truncation):
                raise ValueError(
                    "`truncation` must be a Truncation stating the top_k/top_p/min_p/temperature you sample with "
                    f"when `widen` is given (got {truncation!r}); call generate() with **processor.generate_kwargs()"
                )
            if not isinstance(widen, Widening):
                raise ValueError(f"`widen` must be a Widening when `truncation` is given, got {widen!r}")
            self._truncation_plan = TruncationSchedule(truncation, widen, schedule)
        super().__init__(eos_token_id)

    def generate_kwargs(self) -> dict[str, object]:
        """``generate()`` kwargs for this processor: with ``widen``, transformers' truncation off (see above)."""
        if self.truncation is None:
            return {"do_sample": True}
        return self.truncation.generate_kwargs()

    def _reset_state(self) -> None:
        # (batch,) position of each row's latest restart; _NEVER for a row that has had none (made per generation).
        self._last_trigger = torch.empty(0, dtype=torch.long)
        # The last position at which some row's multiplier is not 1.0 (kept on the CPU only, see process()).
        self._hot_until = _NEVER
        if self.early_trigger is not None:
            self.early_trigger.reset()

    def _start_state(self, batch_size: int, prompt_length: int, device: torch.device | None) -> None:
        self._last_trigger = torch.full((batch_size,), _NEVER, dtype=torch.long, device=device)
        if self.early_trigger is not None:
            self.early_trigger.start(batch_size, prompt_length, device)

    def _rewind_state(self, row: int, length: int, dropped: int) -> None:
        if self.early_trigger is not None:
            self.early_trigger.rewind(row, length)
        # Restarts at removed positions never happened: fall back to the latest one still kept.
        restarts = [pos for pos, hit in self._row_history(row, "evicted") if hit and pos < length]
        if self.early_trigger is not None:
            restarts += [pos for pos, hit in self._row_history(row, "early") if hit and pos < length]
        self._last_trigger[row] = max(restarts) if restarts else _NEVER

    def process(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        eos: torch.Tensor,
        positions: int | torch.Tensor,
    ) -> torch.Tensor:
        if self.trigger == "argmax":
            evicted = eos_on_top(scores, eos)
        else:
            probs = torch.softmax(scores.float(), dim=-1).index_select(-1, eos)
            p_eos = probs[:, 0] if probs.shape[1] == 1 else probs.sum(-1)  # a view for the usual single EOS id
            # A row without any finite score gives NaN, which compares False: no eviction there.
            if self.trigger == "sample":
                evicted = torch.rand_like(p_eos) < p_eos
            else:
                evicted = p_eos >= float(self.trigger)
        if self.early_trigger is not None:
            early = self.early_trigger.update_from_scores(scores, eos) & ~evicted
            restart = evicted | early
            self._record(positions, evicted=evicted, early=early)
        else:
            restart = evicted
            self._record(positions, evicted=evicted)
        device = scores.device
        if self._last_trigger.device != device:  # started before any scores were seen (start()): on the CPU
            self._last_trigger = self._last_trigger.to(device)
        table = self._table
        # On the CPU, where reading a value back is free: when no row restarts and every row's schedule has
        # ended (most steps), the multiplier is 1.0 everywhere and only EOS needs masking.
        tracked = device.type == "cpu" and isinstance(positions, int) and table.exact and not table.forever
        if tracked and self._truncation_plan is None and positions > self._hot_until and not bool(restart.any()):
            out = scores.index_fill(-1, eos, float("-inf"))
            if may_hold_lone_eos(out):
                out = restore_lone_eos(out, eos, scores.index_select(-1, eos), out.amax(-1, keepdim=True))
            return out
        pos = positions.to(device) if isinstance(positions, torch.Tensor) else positions
        self._last_trigger = torch.where(restart, pos, self._last_trigger)
        since = pos - self._last_trigger  # huge for rows that never restarted
        values = table.on(device)
        if tracked:  # the table's last entry is 1.0: a row is hot while since < len(values) - 1
            self._hot_until = int(self._last_trigger.max()) + values.shape[0] - 2
        if table.exact and not table.forever:
            # The table ends with 1.0: the end of the schedule and rows that never restarted both land there.
            factor = values[since.clamp(0, values.shape[0] - 1)]
        else:
            factor = table.lookup(since, self._last_trigger != _NEVER)
        divisor = factor.to(scores.dtype)[:, None]
        out = (scores / divisor).index_fill_(-1, eos, float("-inf"))
        if may_hold_lone_eos(out):  # the caller's scores still hold the EOS scores to put back
            out = restore_lone_eos(out, eos, scores.index_select(-1, eos) / divisor, out.amax(-1, keepdim=True))
        if self._truncation_plan is not None:  # per-row top-k/top-p/min-p, widened after an eviction
            rows = self._truncation_plan.row_values(since, self._last_trigger != _NEVER, out.shape[-1])
            out = truncate_rows(out, *rows, temperature=self._truncation_plan.configured.temperature)
        return out

    @property
    def evictions(self) -> list[list[int]]:
        """Per row, the generated steps at which EOS was evicted."""
        return [[s for s, v in row if v] for row in self._per_row("evicted")]

    @property
    def early_triggers(self) -> list[list[int]]:
        """Per row, the generated steps at which the early trigger restarted the schedule (no eviction)."""
        if self.early_trigger is None:
            return [[] for _ in range(self._batch or 0)]
        return [[s for s, v in row if v] for row in self._per_row("early")]

    def event_counts(self, batch_size: int) -> list[int]:
        """Evictions per row (the ``EventSource`` protocol of :class:`~perpetual_logits.EvictionBudgetCriteria`)."""
        counts = [len(steps) for steps in self.evictions]
        return counts if len(counts) == batch_size else [0] * batch_size

    @property
    def multiplier(self) -> list[float]:
        """The multiplier each row used at its latest step."""
        if not self._records:
            return []
        last = self._records[-1].positions
        pos = last if isinstance(last, int) else last.to(self._last_trigger.device)
        since = pos - self._last_trigger
        restarted = self._last_trigger != _NEVER
        return multipliers(self._table, since, restarted).tolist()


_NEVER = -(1 << 40)
