"""Per-row top-k / top-p / min-p, and truncation that starts wider after an event and returns on a schedule.

The blog's Method 2 also widens the sampling set after an eviction ("top-k and nucleus sampling with higher
thresholds"). transformers configures truncation once per ``generate()`` call, for every row alike
(``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``). This module does it per row:

* :func:`truncate_rows` applies top-k, then top-p, then min-p with a value per row. Row by row it gives exactly
  what transformers' warpers give in that order (tested on random logits, ties and ``-inf`` included).
* :class:`Truncation` states the configured values (what ``generate()`` would apply); :class:`Widening` states
  the wider values at the event and, optionally, the schedule that brings them back.
* :class:`TruncationSchedule` turns steps-since-the-event into per-row values.
* :class:`RowTruncation` is a ``LogitsProcessor`` with per-row values the caller sets before each step, and
  :func:`take_over_truncation` swaps it in for the warpers of a ``LogitsProcessorList`` built by transformers.

The mapping from a schedule to truncation. A :class:`~perpetual_logits.Schedule` gives a multiplier ``f(s)``
that is its peak at ``s = 0`` and exactly 1.0 from ``s = length`` on. The truncation moves from the wide value
back to the configured one in the same proportion::

    w(s) = (f(s) - 1) / (f(0) - 1)          # 1 at the event, 0 from `length` on (clipped to [0, 1])
    value(s) = (1 - w(s)) * configured + w(s) * wide
    top_k(s) = round(...)                   # top_k=0 ("off") counts as the vocabulary size here

With ``LinearDecay(2.0, 10)``, ``configured top_k=50`` and ``Widening(top_k=200)``, five steps after the event the
multiplier is 1.5 (half-way back) and top-k is 125. A schedule whose peak is 1.0 (``Constant(1.0, steps=5)``)
keeps the wide values for its ``length`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers import LogitsProcessor

from ._moved import old_names
from .schedules import Schedule

if not TYPE_CHECKING:  # names that moved to the processor-list module or were renamed, for one release
    __getattr__ = old_names(
        __name__,
        {
            **{
                name: ("perpetual_logits.processor_list", name)
                for name in ("check_no_double_truncation", "configured_truncation", "take_over_truncation")
            },
            "Widen": (__name__, "Widening"),
        },
    )

__all__ = [
    "RowTruncation",
    "RowValues",
    "Truncation",
    "TruncationSchedule",
    "Widening",
    "truncate_rows",
]

_NEG_INF = float("-inf")


# -- validation ---------------------------------------------------------------------------------------------
def _top_k(value: object, name: str = "top_k") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0 (0 = no top-k), got {value!r}")
    return value


def _top_p(value: object, name: str = "top_p") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be a float in (0, 1] (1.0 = no top-p), got {value!r}")
    return float(value)


def _min_p(value: object, name: str = "min_p") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1] (0.0 = no min-p), got {value!r}")
    return float(value)


def _temperature(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`temperature` must be a finite float > 0, got {value!r}")
    return float(value)


# -- configured and widened values --------------------------------------------------------------------------
@dataclass(frozen=True)
class Truncation:
    """The truncation sampling is configured with: what ``generate()``'s warpers would apply to every row.

    The defaults are transformers' defaults for ``do_sample=True`` (``top_k=50``, no top-p, no min-p,
    temperature 1.0). ``temperature`` matters because transformers applies it *before* top-p and min-p.

    Args:
        top_k (`int`, defaults to 50): keep the ``top_k`` best tokens; 0 = no top-k.
        top_p (`float`, defaults to 1.0): nucleus mass in (0, 1]; 1.0 = no top-p.
        min_p (`float`, defaults to 0.0): min-p in [0, 1]; 0.0 = no min-p.
        temperature (`float`, defaults to 1.0): the temperature ``generate()`` samples with.

    Example:

    ```python
    >>> from perpetual_logits import Truncation
    >>> Truncation(top_k=50, top_p=0.9).generate_kwargs()
    {'do_sample': True, 'top_k': 0, 'top_p': 1.0, 'min_p': None, 'temperature': 1.0}

    ```
    """

    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_k", _top_k(self.top_k))
        object.__setattr__(self, "top_p", _top_p(self.top_p))
        object.__setattr__(self, "min_p", _min_p(self.min_p))
        object.__setattr__(self, "temperature", _temperature(self.temperature))

    def generate_kwargs(self) -> dict[str, Any]:
        """``generate()`` keyword arguments for a processor that applies this truncation itself.

        transformers' own top-k / top-p / min-p are turned off (otherwise they would truncate a second time,
        e.g. the implicit ``top_k=50`` of ``do_sample=True``); the temperature is passed on unchanged, since
        transformers applies it after user processors.
        """
        return {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_p": None, "temperature": self.temperature}


@dataclass(frozen=True)
class Widening:
    """Wider truncation right after an event (an eviction, a rewind), back to the configured one on a schedule.

    Each value is the setting at the event (schedule step 0); ``None`` leaves that truncation as configured.
    The values must not be narrower than the configured ones (checked against a :class:`Truncation` by
    :meth:`check`). The way back follows ``schedule`` (by default the caller's temperature schedule), mapped as
    described in :mod:`perpetual_logits.truncation`.

    Args:
        top_k (`int`, *optional*): top-k at the event; 0 = no top-k.
        top_p (`float`, *optional*): top-p at the event, in (0, 1]; 1.0 = no top-p.
        min_p (`float`, *optional*): min-p at the event, in [0, 1]; 0.0 = no min-p.
        schedule (`Schedule`, *optional*): how the values return; default: the temperature schedule.

    Example:

    ```python
    >>> from perpetual_logits import LinearDecay, Truncation, Widening
    >>> from perpetual_logits.truncation import TruncationSchedule
    >>> import torch
    >>> plan = TruncationSchedule(Truncation(top_k=50), Widening(top_k=200), LinearDecay(2.0, 10))
    >>> plan.row_values(torch.tensor([0, 5, 10, 0]), torch.tensor([True, True, True, False]), 2048).top_k
    tensor([200, 125,  50,  50])

    ```
    """

    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        if self.top_k is None and self.top_p is None and self.min_p is None:
            raise ValueError("`Widening` needs at least one of `top_k`, `top_p`, `min_p`")
        if self.top_k is not None:
            object.__setattr__(self, "top_k", _top_k(self.top_k))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", _top_p(self.top_p))
        if self.min_p is not None:
            object.__setattr__(self, "min_p", _min_p(self.min_p))
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(
                f"`schedule` must be None or a perpetual_logits Schedule (LinearDecay, ...), got {self.schedule!r}"
            )

    def check(self, configured: Truncation) -> None:
        """Raise ``ValueError`` if a widened value is narrower than the configured one."""
        if not isinstance(configured, Truncation):
            raise ValueError(f"`configured` must be a Truncation, got {configured!r}")
        k = self.top_k
        if k is not None and configured.top_k != 0 and (k != 0 and k < configured.top_k):
            raise ValueError(f"`top_k`={k} is narrower than the configured top_k={configured.top_k}")
        if k is not None and configured.top_k == 0 and k != 0:
            raise ValueError(f"`top_k`={k} is narrower than the configured top_k=0 (no top-k)")
        if self.top_p is not None and self.top_p < configured.top_p:
            raise ValueError(f"`top_p`={self.top_p} is narrower than the configured top_p={configured.top_p}")
        if self.min_p is not None and self.min_p > configured.min_p:
            raise ValueError(f"`min_p`={self.min_p} is narrower than the configured min_p={configured.min_p}")


def weight_table(schedule: Schedule) -> torch.Tensor:
    """``w(s)`` for ``s = 0 .. length-1``, then 0.0, as float64 (see the module notes).

    A schedule that never ends (``length=None``) gives ``[w(0), 0.0]``; look it up with ``forever=True``.
    """
    length = schedule.length
    peak = schedule(0)
    steps = 1 if length is None else length

    def w(s: int) -> float:
        if peak == 1.0:
            return 1.0  # a flat schedule: wide for as long as it lasts
        return min(1.0, max(0.0, (schedule(s) - 1.0) / (peak - 1.0)))

    return torch.tensor([w(s) for s in range(steps)] + [0.0], dtype=torch.float64)


class RowValues(NamedTuple):
    """Per-row truncation: ``top_k`` (long, 0 = off), ``top_p`` (float64, 1.0 = off), ``min_p`` (float64,
    0.0 = off); ``None`` where a truncation is off in every row at every step (configured off, not widened)."""

    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None


class TruncationSchedule:
    """Per-row truncation values from the steps since each row's latest event.

    Args:
        configured (`Truncation`): the values rows return to (and rows without an event keep).
        widen (`Widening`): the values at the event.
        schedule (`Schedule`, *optional*): the way back; ``widen.schedule`` takes precedence. One of the two is
            required.

    Raises ``ValueError`` when a widened value is narrower than the configured one.
    """

    def __init__(self, configured: Truncation, widen: Widening, schedule: Schedule | None = None) -> None:
        if not isinstance(widen, Widening):
            raise ValueError(f"`widen` must be a Widening, got {widen!r}")
        widen.check(configured)
        chosen = widen.schedule if widen.schedule is not None else schedule
        if not isinstance(chosen, Schedule):
            raise ValueError(f"`schedule` must be a Schedule when `widen.schedule` is None, got {chosen!r}")
        self.configured, self.widen, self.schedule = configured, widen, chosen
        self._table = weight_table(chosen)
        self._forever = chosen.length is None

    def weights(self, steps_since: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``w`` per row (float64): 0 for inactive rows and from the schedule's end on."""
        if self._table.device != active.device:
            self._table = self._table.to(active.device)
        s = steps_since.to(active.device).clamp(0, self._table.shape[0] - 1)
        if self._forever:
            s = torch.zeros_like(s)
        return torch.where(active, self._table[s], torch.zeros((), dtype=torch.float64, device=active.device))

    def row_values(self, steps_since: torch.Tensor, active: torch.Tensor, vocab_size: int) -> RowValues:
        """Per-row values ``steps_since`` steps after each active row's event (configured for inactive rows).

        Args:
            steps_since (`torch.LongTensor` of shape `(batch,)`): steps since the row's latest event (0 = the
                event's own step).
            active (`torch.BoolTensor` of shape `(batch,)`): whether the row has had an event.
            vocab_size (`int`): the vocabulary size (``top_k=0`` counts as this when interpolating).
        """
        w = self.weights(steps_since, active)
        conf, wide = self.configured, self.widen

        def lerp(configured: float, widened: float | None, off: float) -> torch.Tensor | None:
            target = configured if widened is None else widened
            if configured == off and target == off:
                return None
            return (1.0 - w) * configured + w * target

        k_conf = conf.top_k or vocab_size
        k_wide = k_conf if wide.top_k is None else (wide.top_k or vocab_size)
        k = lerp(float(k_conf), float(k_wide), float(vocab_size))
        top_k = None
        if k is not None:
            top_k = torch.round(k).long()
            top_k = torch.where(top_k >= vocab_size, torch.zeros_like(top_k), top_k)
        return RowValues(top_k, lerp(conf.top_p, wide.top_p, 1.0), lerp(conf.min_p, wide.min_p, 0.0))


# -- the per-row warpers ------------------------------------------------------------------------------------
def truncate_rows(
    scores: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    min_tokens_to_keep: int = 1,
    filter_value: float = _NEG_INF,
) -> torch.Tensor:
    """Top-k, then top-p, then min-p, with one value per row; returns a new tensor.

    Row by row, the result equals transformers' ``TopKLogitsWarper(k)``, ``TopPLogitsWarper(p)`` and
    ``MinPLogitsWarper(m)`` applied in that order (the order ``generate()`` uses), with the row's values; a
    value that means "off" skips that warper for the row.

    ``temperature``: the kept set is computed on ``scores / temperature`` -- what transformers' temperature
    warper hands to its truncation warpers -- and applied to ``scores`` unchanged. A processor that runs before
    ``generate()``'s temperature (every user processor does) passes the configured temperature here, so that
    top-p and min-p pick the set they would have picked after it.

    Args:
        scores (`torch.FloatTensor` of shape `(batch, vocab)`): the scores.
        top_k (`torch.LongTensor` of shape `(batch,)`, *optional*): per row; 0 = no top-k.
        top_p (`torch.Tensor` of shape `(batch,)`, *optional*): per row; 1.0 = no top-p. Used in float64 for
            ``1 - top_p``, as transformers does with its Python float: pass float64 for exact agreement.
        min_p (`torch.Tensor` of shape `(batch,)`, *optional*): per row; 0.0 = no min-p.
        temperature (`float`, defaults to 1.0): see above.
        min_tokens_to_keep (`int`, defaults to 1): as in transformers' warpers.
        filter_value (`float`, defaults to `-inf`): the value of removed tokens.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.truncation import truncate_rows
    >>> scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    >>> truncate_rows(scores, top_k=torch.tensor([2, 0]))
    tensor([[4., 3., -inf, -inf],
            [4., 3., 2., 1.]])
    >>> truncate_rows(scores, top_p=torch.tensor([0.5, 0.9], dtype=torch.float64))
    tensor([[4., -inf, -inf, -inf],
            [4., 3., 2., -inf]])

    ```
    """
    if scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"`scores` must be a floating-point tensor of shape (batch, vocab), got {tuple(scores.shape)}")
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"`min_tokens_to_keep` must be an int >= 1, got {min_tokens_to_keep!r}")
    temperature = _temperature(temperature)
    batch, vocab = scores.shape
    for name, value in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if value is not None and tuple(value.shape) != (batch,):
            raise ValueError(f"`{name}` must have shape ({batch},), got {tuple(value.shape)}")
    device = scores.device
    # With temperature 1 the progressively masked `view` is the result; otherwise the removals are collected
    # and applied to the untempered scores.
    tempered = temperature != 1.0
    view = scores / temperature if tempered else scores  # what the warpers would see
    removed: torch.Tensor | None = None
    changed = False

    def drop(mask: torch.Tensor) -> None:
        nonlocal view, removed, changed
        view = view.masked_fill(mask, filter_value)
        changed = True
        if tempered:
            removed = mask if removed is None else removed | mask

    if top_k is not None:
        k = top_k.to(device=device, dtype=torch.long)
        on = k > 0
        if bool(on.any()):
            k = torch.where(on, k.clamp(min=min_tokens_to_keep, max=vocab), torch.ones_like(k))
            kth = torch.topk(view, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
            drop(view < kth.masked_fill(~on[:, None], _NEG_INF))  # nothing is below -inf: off rows keep all

    if top_p is not None:
        p = top_p.to(device=device, dtype=torch.float64)
        on = p < 1.0
        if bool(on.any()):
            sorted_logits, sorted_indices = torch.sort(view, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            limit = torch.where(on, 1.0 - p, -1.0).to(cumulative.dtype)  # off rows: no cumulative sum is <= -1
            drop_sorted = cumulative <= limit[:, None]
            drop_sorted[:, -min_tokens_to_keep:] = False
            drop(drop_sorted.scatter(1, sorted_indices, drop_sorted))

    if min_p is not None:
        m = min_p.to(device=device, dtype=torch.float64)
        if bool((m > 0.0).any()):  # rows with min_p = 0 have threshold 0 and keep everything
            probs = torch.softmax(view, dim=-1)
            mask = probs < m.to(probs.dtype)[:, None] * probs.amax(dim=-1, keepdim=True)
            keep = torch.topk(probs, min(min_tokens_to_keep, vocab), dim=-1).indices
            drop(mask.scatter_(-1, keep, False))

    if not changed:
        return scores.clone()
    if removed is None:
        return view
    return scores.masked_fill(removed, filter_value)


class RowTruncation(LogitsProcessor):
    r"""Top-k / top-p / min-p with a value per row, set by the caller before each step.

    Until :meth:`set_rows` is called, every row uses the configured values; :meth:`set_rows` with ``None``
    for a value goes back to the configured one. It stands in for transformers' ``TopKLogitsWarper``,
    ``TopPLogitsWarper`` and ``MinPLogitsWarper`` (see :func:`take_over_truncation`) and sits where they sat,
    after the temperature warper.

    Args:
        top_k (`int`, defaults to 0): configured top-k; 0 = none.
        top_p (`float`, defaults to 1.0): configured top-p; 1.0 = none.
        min_p (`float`, defaults to 0.0): configured min-p; 0.0 = none.
        min_tokens_to_keep (`int`, defaults to 1): as in transformers' warpers.
        filter_value (`float`, defaults to `-inf`): the value of removed tokens.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.truncation import RowTruncation
    >>> proc = RowTruncation(top_k=2)
    >>> scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    >>> proc.set_rows(top_k=torch.tensor([2, 3]))
    >>> proc(torch.ones(2, 1, dtype=torch.long), scores)
    tensor([[4., 3., -inf, -inf],
            [4., 3., 2., -inf]])

    ```
    """

    def __init__(
        self,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        min_tokens_to_keep: int = 1,
        filter_value: float = _NEG_INF,
    ) -> None:
        self.top_k = _top_k(top_k)
        self.top_p = _top_p(top_p)
        self.min_p = _min_p(min_p)
        if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"`min_tokens_to_keep` must be an int >= 1, got {min_tokens_to_keep!r}")
        if isinstance(filter_value, bool) or not isinstance(filter_value, (int, float)):
            raise ValueError(f"`filter_value` must be a float, got {filter_value!r}")
        self.min_tokens_to_keep = min_tokens_to_keep
        self.filter_value = float(filter_value)
        self.temperature = 1.0  # informational (take_over_truncation records the temperature warper's value)
        self._rows: dict[str, torch.Tensor | None] = {"top_k": None, "top_p": None, "min_p": None}

    @property
    def configured(self) -> Truncation:
        """The configured values, as a :class:`Truncation`."""
        return Truncation(self.top_k, self.top_p, self.min_p, self.temperature)

    def set_rows(
        self,
        top_k: torch.Tensor | None = None,
        top_p: torch.Tensor | None = None,
        min_p: torch.Tensor | None = None,
    ) -> None:
        """Per-row values for the next calls, each of shape ``(batch,)``; ``None``: the configured value."""
        for name, value in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 1):
                raise ValueError(f"`{name}` must be None or a 1-D tensor (one value per row), got {value!r}")
            self._rows[name] = value

    def _values(self, batch: int, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        out: list[torch.Tensor | None] = []
        specs = (("top_k", torch.long, 0), ("top_p", torch.float64, 1.0), ("min_p", torch.float64, 0.0))
        for name, dtype, off in specs:
            rows = self._rows[name]
            if rows is not None:
                if rows.shape[0] != batch:
                    raise ValueError(f"per-row `{name}` has {rows.shape[0]} values for a batch of {batch}")
                out.append(rows)
            elif getattr(self, name) != off:
                out.append(torch.full((batch,), getattr(self, name), dtype=dtype, device=device))
            else:
                out.append(None)
        return tuple(out)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top_k, top_p, min_p = self._values(scores.shape[0], scores.device)
        return truncate_rows(  # type: ignore[return-value]
            scores,
            top_k,
            top_p,
            min_p,
            min_tokens_to_keep=self.min_tokens_to_keep,
            filter_value=self.filter_value,
        )
