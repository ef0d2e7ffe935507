"""Editing the ``LogitsProcessorList`` that ``generate()`` builds: every place the package rearranges it.

``generate()`` appends its sampling warpers (temperature, top-k, top-p, min-p, ...) after the user's processors.
Backstep generation changes that list in three ways, all here:

* **temperature** -- a per-row multiplier goes just before the first sampling warper
  (:func:`insert_before_warpers`), so it composes with the configured temperature before any truncation;
* **truncation** -- the top-k / top-p / min-p warpers are replaced by one per-row processor that can widen rows
  after a rewind (:func:`take_over_truncation`, :func:`configured_truncation`); a processor that truncates
  itself must not meet ``generate()``'s own truncation (:func:`check_no_double_truncation`);
* **lengths** -- processors judged by a row's length or tokens run per group of equal-length rows
  (:func:`per_row_lengths`, :class:`RowLengths`);
* **calls** -- the finished list is called every step as :class:`StepProcessors`, which checks once what
  transformers' list checks on every call (the extra arguments a processor asks for).

Why the lengths matter: inside a backstep batch the rows have different lengths (a rewound row is shorter than
its neighbours). Processors receive the rows left-padded to the longest (``generate()``'s own layout), so a
processor that reads ``input_ids.shape[-1]`` would judge every row by the longest one, and one that reads the
tokens would count a shorter row's padding as text it wrote (a repetition penalty would penalise the pad id).
Each processor of :data:`LENGTH_DEPENDENT` and :data:`READS_TOKENS` is therefore run per group of rows of equal
length, on exactly those rows' tokens -- what it would see if that row ran alone (with its own prompt padding).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import logits_process as lp

from .dry import DRYLogitsProcessor
from .truncation import RowTruncation, Truncation

__all__ = [
    "LENGTH_DEPENDENT",
    "NOT_APPLICABLE",
    "READS_TOKENS",
    "TRUNCATION_WARPERS",
    "WARPERS",
    "RowLengths",
    "StepProcessors",
    "check_no_double_truncation",
    "configured_truncation",
    "insert_before_warpers",
    "per_row_lengths",
    "take_over_truncation",
]

# Processors transformers builds from a generation config whose result depends on the sequence length
# (they read input_ids.shape[-1] or a current length; n-gram bans also must not span a shorter row's padding).
LENGTH_DEPENDENT: tuple[type, ...] = (
    lp.MinLengthLogitsProcessor,
    lp.MinNewTokensLengthLogitsProcessor,
    lp.ExponentialDecayLengthPenalty,
    lp.ForcedEOSTokenLogitsProcessor,
    lp.ForcedBOSTokenLogitsProcessor,
    lp.SuppressTokensAtBeginLogitsProcessor,
    lp.NoRepeatNGramLogitsProcessor,
)

# Processors that read the tokens themselves: the padding before a shorter row is not its text (the penalty
# would count the pad id as written, a sequence or a repeat could match across it, a last-n window would hold
# fewer real tokens).
READS_TOKENS: tuple[type, ...] = (
    lp.RepetitionPenaltyLogitsProcessor,
    lp.SequenceBiasLogitsProcessor,
    lp.NoBadWordsLogitsProcessor,
    DRYLogitsProcessor,
)

# Length-reading processors that never take part in a decoder-only sampling/greedy run (encoder-decoder,
# beam search, model-specific), or whose row index matters (a per-row sub-batch would renumber rows).
NOT_APPLICABLE: tuple[type, ...] = (
    lp.EncoderNoRepeatNGramLogitsProcessor,
    lp.EncoderRepetitionPenaltyLogitsProcessor,
    lp.WhisperTimeStampLogitsProcessor,
    lp.BarkEosPrioritizerLogitsProcessor,
    lp.PrefixConstrainedLogitsProcessor,
    lp.ClassifierFreeGuidanceLogitsProcessor,
    lp.UnbatchedClassifierFreeGuidanceLogitsProcessor,
    lp.AlternatingCodebooksLogitsProcessor,
    lp.SynthIDTextWatermarkLogitsProcessor,
    lp.WatermarkLogitsProcessor,
    lp.WhisperNoSpeechDetection,
    lp.DiaClassifierFreeGuidanceLogitsProcessor,
    lp.DiaEOSChannelFilterLogitsProcessor,
    lp.DiaEOSDelayPatternLogitsProcessor,
)


class RowLengths(LogitsProcessor):
    """Runs ``inner`` once per group of rows that have the same length, on their unpadded-to-the-longest tokens.

    Args:
        inner: the transformers processor.
        lengths: returns each row's current length (prompt included).
    """

    def __init__(self, inner: LogitsProcessor, lengths: Callable[[], list[int]]) -> None:
        self.inner = inner
        self.lengths = lengths
        # transformers' repetition penalty skips each row's prompt padding, counted per batch row: a group of rows
        # runs on a copy of the processor holding those rows' counts (the caller's processor is never changed).
        ignore = inner.prompt_ignore_length if isinstance(inner, lp.RepetitionPenaltyLogitsProcessor) else None
        self.row_ignore: torch.Tensor | None = (
            ignore if isinstance(ignore, torch.Tensor) and ignore.dim() == 1 else None
        )

    def __repr__(self) -> str:
        return f"RowLengths({self.inner!r})"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lens = self.lengths()
        if len(set(lens)) == 1:
            return self.inner(input_ids, scores)
        out = scores.clone()
        per_row = self.row_ignore is not None and self.row_ignore.shape[0] == len(lens)
        for length in sorted(set(lens)):
            rows = torch.tensor([b for b, n in enumerate(lens) if n == length], device=scores.device)
            ids = input_ids[rows, input_ids.shape[-1] - length :]
            inner = self.inner
            if per_row:
                inner = copy.copy(inner)
                inner.prompt_ignore_length = self.row_ignore.to(rows.device)[rows]  # type: ignore[attr-defined,union-attr]
            out[rows] = inner(ids, scores[rows])
        return out  # type: ignore[return-value]


def per_row_lengths(processors: LogitsProcessorList, lengths: Callable[[], list[int]]) -> LogitsProcessorList:
    """A new list where every length-dependent or token-reading processor is wrapped in :class:`RowLengths`."""
    return LogitsProcessorList(
        # exact types only: a subclass may keep per-row state that a sub-batch would renumber
        [RowLengths(p, lengths) if type(p) in LENGTH_DEPENDENT + READS_TOKENS else p for p in processors]
    )


class StepProcessors(LogitsProcessorList):
    """The processors of a backstep run, called once per step with the rows and their scores only.

    transformers' ``LogitsProcessorList`` reads each processor's signature on every call (to pass the extra
    arguments some processors ask for); that costs about as much as a cheap processor itself, every step. Here
    the same check runs once, when the list is built: a processor that asks for more than ``input_ids`` and
    ``scores`` fails then with transformers' message, as it would have at the first step (the loop passes
    nothing else). Not to be changed once built.

    Args:
        processors: the processors, in order.

    Example:

    ```python
    >>> import torch
    >>> from transformers import MinLengthLogitsProcessor
    >>> processors = StepProcessors([MinLengthLogitsProcessor(3, eos_token_id=0)])
    >>> processors(torch.tensor([[5, 6]]), torch.zeros(1, 4)).tolist()
    [[-inf, 0.0, 0.0, 0.0]]

    ```
    """

    def __init__(self, processors: Iterable[LogitsProcessor]) -> None:
        super().__init__(processors)
        for processor in self:
            names = list(inspect.signature(processor.__call__).parameters)
            if len(names) > 2:
                raise ValueError(
                    f"Make sure that all the required parameters: {names} for {processor.__class__} are passed to "
                    "the logits processor."
                )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs:
            return super().__call__(input_ids, scores, **kwargs)
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


# -- temperature ------------------------------------------------------------------------------------------
# Every sampling warper transformers' `_get_logits_processor` appends after the user's processors. The
# multiplier must come before all of them: it composes with the configured temperature there and is applied
# before any truncation measures probability mass. (A test fails when transformers adds a warper not listed.)
WARPERS: tuple[type, ...] = (
    lp.TemperatureLogitsWarper,
    lp.TopHLogitsWarper,
    lp.TopKLogitsWarper,
    lp.TopPLogitsWarper,
    lp.MinPLogitsWarper,
    lp.TypicalLogitsWarper,
    lp.EpsilonLogitsWarper,
    lp.EtaLogitsWarper,
)


def insert_before_warpers(processors: LogitsProcessorList, processor: LogitsProcessor) -> LogitsProcessorList:
    """A new list with ``processor`` just before the first sampling warper (or ``LogitNormalization``)."""
    items = list(processors)
    index = next((i for i, p in enumerate(items) if isinstance(p, (*WARPERS, lp.LogitNormalization))), len(items))
    items.insert(index, processor)
    return LogitsProcessorList(items)


# -- truncation -------------------------------------------------------------------------------------------
#: The warpers one :class:`~perpetual_logits.truncation.RowTruncation` replaces (exact types: a subclass may do more).
TRUNCATION_WARPERS: tuple[type, ...] = (lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper)
# The warpers transformers puts after top-k/top-p/min-p (typical, epsilon, eta): with none of those three to
# replace, the per-row truncation goes before them, as transformers would have placed it.
_AFTER_TRUNCATION: tuple[type, ...] = WARPERS[WARPERS.index(lp.MinPLogitsWarper) + 1 :]


def _after_truncation(proc: LogitsProcessor) -> bool:
    """Processors transformers puts after top-k/top-p/min-p (typical, epsilon, eta, watermarks, normalization)."""
    kind = type(proc)
    return isinstance(proc, lp.LogitNormalization) or kind in _AFTER_TRUNCATION or "Watermark" in kind.__name__


def _find_warpers(processors: list[LogitsProcessor]) -> dict[type, int]:
    found: dict[type, int] = {}
    for index, proc in enumerate(processors):
        for kind in TRUNCATION_WARPERS:
            if type(proc) is kind:
                if kind in found:
                    raise ValueError(
                        f"the processor list has more than one {kind.__name__}; cannot tell which one is configured"
                    )
                found[kind] = index
    if found:
        positions = sorted(found.values())
        if positions[-1] - positions[0] != len(positions) - 1:
            raise ValueError("the processor list's top-k/top-p/min-p warpers are not next to each other")
    return found


def configured_truncation(processors: Iterable[LogitsProcessor]) -> Truncation:
    """The truncation a ``LogitsProcessorList`` built by ``generate()`` applies, as a :class:`Truncation`.

    Reads ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper`` (absent = off) and the product of the
    ``TemperatureLogitsWarper``\\ s (absent = 1.0). Raises ``ValueError`` when a warper appears twice.
    """
    items = list(processors)
    found = _find_warpers(items)
    top_k = items[found[lp.TopKLogitsWarper]].top_k if lp.TopKLogitsWarper in found else 0  # type: ignore[attr-defined]
    top_p = items[found[lp.TopPLogitsWarper]].top_p if lp.TopPLogitsWarper in found else 1.0  # type: ignore[attr-defined]
    min_p = items[found[lp.MinPLogitsWarper]].min_p if lp.MinPLogitsWarper in found else 0.0  # type: ignore[attr-defined]
    temperature = 1.0
    for proc in items:
        if isinstance(proc, lp.TemperatureLogitsWarper):
            temperature *= float(proc.temperature)
    return Truncation(int(top_k), float(top_p), float(min_p), temperature)


def take_over_truncation(processors: Iterable[LogitsProcessor]) -> tuple[LogitsProcessorList, RowTruncation]:
    """Replace the top-k / top-p / min-p warpers of a processor list by one :class:`RowTruncation`.

    For a loop that owns its ``LogitsProcessorList`` (as built by ``generate()``): the new list has a
    :class:`RowTruncation` where the first of those warpers was (or, when there were none, before typical /
    epsilon / eta / watermark / normalization processors, else at the end), configured with their values and
    ``min_tokens_to_keep``. The loop calls ``row_truncation.set_rows(...)`` before a step to widen rows. The
    input list is not changed.

    Returns:
        `(LogitsProcessorList, RowTruncation)`: the new list and the processor in it;
        ``row_truncation.configured`` is what the list applied before (see :func:`configured_truncation`).

    Example:

    ```python
    >>> from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    >>> from perpetual_logits.processor_list import take_over_truncation
    >>> warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)])
    >>> new, rows = take_over_truncation(warpers)
    >>> [type(p).__name__ for p in new], rows.configured
    (['TemperatureLogitsWarper', 'RowTruncation'], Truncation(top_k=50, top_p=0.9, min_p=0.0, temperature=0.7))

    ```
    """
    items = list(processors)
    configured = configured_truncation(items)
    found = _find_warpers(items)
    keep_values = {items[i].min_tokens_to_keep for i in found.values()}  # type: ignore[attr-defined]
    filters = {float(items[i].filter_value) for i in found.values()}  # type: ignore[attr-defined]
    if len(keep_values) > 1 or len(filters) > 1:
        raise ValueError("the top-k/top-p/min-p warpers disagree on min_tokens_to_keep or filter_value")
    rows = RowTruncation(
        configured.top_k,
        configured.top_p,
        configured.min_p,
        min_tokens_to_keep=keep_values.pop() if keep_values else 1,
        filter_value=filters.pop() if filters else float("-inf"),
    )
    rows.temperature = configured.temperature
    if found:
        at = min(found.values())
        rest = [p for i, p in enumerate(items) if i not in found.values()]
        rest.insert(at, rows)
    else:
        at = next((i for i, p in enumerate(items) if _after_truncation(p)), len(items))
        rest = [*items[:at], rows, *items[at:]]
    return LogitsProcessorList(rest), rows


def check_no_double_truncation(processors: Iterable[object], generation_config: Any) -> None:
    """Raise ``ValueError`` when a processor that applies truncation itself meets ``generate()``'s own.

    A processor *owns truncation* when it has a ``truncation`` attribute that is a :class:`Truncation` (a
    :class:`~perpetual_logits.PostEOSResamplingLogitsProcessor` with ``widen=``). ``generate()`` must then
    sample without top-k / top-p / min-p of its own (``do_sample=True`` alone implies ``top_k=50``) and with
    the temperature the processor was told. Call this with the user's processors and the generation config
    ``generate()`` resolved (``PerpetualGenerationMixin.generate`` can); a plain ``generate()`` cannot check.
    """
    owners = [p for p in processors if isinstance(getattr(p, "truncation", None), Truncation)]
    if not owners or not getattr(generation_config, "do_sample", False):
        return
    top_k = getattr(generation_config, "top_k", None)
    top_p = getattr(generation_config, "top_p", None)
    min_p = getattr(generation_config, "min_p", None)
    active = []
    if top_k not in (None, 0):
        active.append(f"top_k={top_k}")
    if top_p is not None and top_p < 1.0:
        active.append(f"top_p={top_p}")
    if min_p is not None:
        active.append(f"min_p={min_p}")
    name = type(owners[0]).__name__
    if active:
        raise ValueError(
            f"{name} applies top-k/top-p/min-p itself (widen=...), but generate() would truncate again with "
            f"{', '.join(active)}; pass **processor.generate_kwargs() (top_k=0, top_p=1.0, min_p=None)"
        )
    temperature = getattr(generation_config, "temperature", None)
    temperature = 1.0 if temperature is None else float(temperature)
    for owner in owners:
        stated = owner.truncation.temperature  # type: ignore[attr-defined]
        if not math.isclose(stated, temperature):
            raise ValueError(
                f"{name} computes top-p/min-p at temperature {stated} (its `truncation`), but generate() samples "
                f"at temperature {temperature}; state the same temperature in both"
            )
