"""Why models stop: per-step statistics of the next-token distribution (the blog's motivating experiments).

Four numbers per generated step, all in **bits** (base-2 logarithms) throughout this module, its figures and
the CLI's reports:

* ``eos_prob`` — the probability of a token set (the EOS ids by default), summed over the set;
* ``info`` — its information content ``-log2(eos_prob)`` in bits; ``+inf`` when the set has probability 0
  (every id in it is at -inf), never NaN;
* ``entropy`` — ``H = -Σ p log2 p`` of the whole next-token distribution, in bits (``0 · log 0 = 0``);
* ``varentropy`` — the variance of the surprisal ``-log2 p`` under ``p``: ``Σ p (-log2 p - H)^2``, in bits².

Two ways to get them:

* :class:`StepStatsRecorder`, a ``LogitsProcessor`` that changes nothing, records them while ``generate()``
  runs. It sees the scores after the processors listed before it and before temperature/top-k/top-p (see
  :mod:`perpetual_logits.processors`). Inside backstep generation the records of rewound positions are
  **dropped**: the statistics describe the text that survives, one entry per kept position.
* :func:`step_stats` computes them afterwards from ``output_logits`` (the model's raw distribution) or
  ``output_scores`` (after every processor and warper) of a finished ``generate()`` call.

:func:`blockwise` averages them over blocks of consecutive steps (the blog's figure 1) and :func:`eos_window`
lists the top tokens of the last steps before EOS (figures 2 and 3); :mod:`perpetual_logits.analysis.plotting` draws
both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, overload

import torch

from .. import _validation
from ..distributions import check_distribution, distribution_stats, in_bits, raw_stats
from ..processors import EOSLogitsProcessor

__all__ = [
    "StepStats",
    "StepStatsRecorder",
    "WindowStep",
    "aligned_means",
    "blockwise",
    "eos_window",
    "step_stats",
    "token_label",
]

_NAMES = ("eos_prob", "info", "entropy", "varentropy")


@dataclass
class StepStats:
    """Per-step statistics of one row (one generated sequence); every list has one entry per step.

    Attributes:
        eos_prob (`list[float]`): probability of the token set (EOS by default), in [0, 1].
        info (`list[float]`): its information content ``-log2(eos_prob)``, in bits (``inf`` when impossible).
        entropy (`list[float]`): entropy of the next-token distribution, in bits.
        varentropy (`list[float]`): variance of the surprisal ``-log2 p``, in bits².

    Example:

    ```python
    >>> from perpetual_logits.analysis import StepStats
    >>> stats = StepStats(eos_prob=[0.5], info=[1.0], entropy=[1.0], varentropy=[0.0])
    >>> len(stats), stats.to_dict()["info"]
    (1, [1.0])

    ```
    """

    eos_prob: list[float]
    info: list[float]
    entropy: list[float]
    varentropy: list[float]

    def __post_init__(self) -> None:
        lengths = {len(getattr(self, name)) for name in _NAMES}
        if len(lengths) != 1:
            raise ValueError(f"every StepStats list must have the same length, got lengths {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.eos_prob)

    def to_dict(self) -> dict[str, list[float]]:
        """The four lists by name (copies), e.g. for JSON."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    def __getitem__(self, index: slice) -> StepStats:
        """A slice of the steps, e.g. ``stats[:n]``."""
        if not isinstance(index, slice):
            raise TypeError("StepStats supports slicing only, e.g. stats[:10]; use stats.entropy[i] for a value")
        return StepStats(*(getattr(self, name)[index] for name in _NAMES))


class StepStatsRecorder(EOSLogitsProcessor):
    r"""Record the probability of EOS (or any token set), its information content, and the entropy and
    varentropy of the next-token distribution at every step, in bits. Returns the scores unchanged.

    Put it last in ``logits_processor`` to measure what the sampler is given before temperature and
    top-k/top-p; put it first to measure the model's own distribution. Per step it keeps a copy of the
    scores; the statistics are computed for 64 steps at a time (and whenever they are read).

    Records follow the row's position clock of :class:`~perpetual_logits.EOSLogitsProcessor`: in backstep
    generation the statistics of rewound positions are dropped, so :attr:`stats` describes the final text
    (position by position, the latest draw wins). At a rewind point the backstep loop bans EOS before the
    processors run, so a position regenerated there records EOS probability 0 (information ``inf``): the
    recorder reports the distribution the token was actually drawn from. A new ``generate()`` call starts
    fresh records; call :meth:`reset` between calls whose prompt is the previous output.

    Args:
        eos_token_id (`int` or `list[int]`): the id(s) that end generation.
        token_id (`int` or `list[int]`, *optional*): the token set to follow; defaults to ``eos_token_id``.
            With several ids their probabilities are summed.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.analysis import StepStatsRecorder
    >>> recorder = StepStatsRecorder(eos_token_id=2)
    >>> scores = torch.zeros(1, 4)   # uniform over 4 tokens
    >>> torch.equal(recorder(torch.tensor([[1, 3]]), scores), scores)
    True
    >>> stats = recorder.stats[0]
    >>> [round(v, 4) for v in (stats.eos_prob[0], stats.info[0], stats.entropy[0], stats.varentropy[0])]
    [0.25, 2.0, 2.0, 0.0]

    ```
    """

    def __init__(
        self,
        eos_token_id: int | list[int] | tuple[int, ...] | torch.Tensor,
        token_id: int | list[int] | tuple[int, ...] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(eos_token_id)
        self.token_id: tuple[int, ...] = (
            self.eos_token_id if token_id is None else _validation.eos_ids(token_id, "token_id")
        )
        self._ids_by_device: dict[torch.device, torch.Tensor] = {}

    def process(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        eos: torch.Tensor,
        positions: int | torch.Tensor,
    ) -> torch.Tensor:
        ids = self._ids_by_device.get(scores.device)
        if ids is None:
            if max(self.token_id) >= scores.shape[-1]:
                raise ValueError(
                    f"`token_id` {max(self.token_id)} is outside the vocabulary of size {scores.shape[-1]}"
                )
            ids = torch.tensor(self.token_id, dtype=torch.long, device=scores.device)
            self._ids_by_device[scores.device] = ids
        # No validation pass here: this runs every step inside generate(), where scores come from the model.
        # The statistics are computed a chunk of steps at a time (one copy per step); bits when `stats` is read.
        self._record_scores(positions, scores)
        return scores

    def _statistics(self, scores: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = self._ids_by_device[scores.device]
        steps, batch, vocab = scores.shape
        raw = raw_stats(scores.reshape(steps * batch, vocab), ids)
        return {name: values.reshape(steps, batch) for name, values in raw.items()}

    @property
    def stats(self) -> list[StepStats]:
        """Per row, the statistics of every kept generated step (rewound positions dropped)."""
        columns = {name: self._per_row(name) for name in _RAW}
        result = []
        for row in range(len(columns["log_set"])):
            raw = {name: torch.tensor([v for _, v in columns[name][row]], dtype=torch.float32) for name in _RAW}
            values = in_bits(raw)
            result.append(StepStats(*(values[name].tolist() for name in _NAMES)))
        return result


_RAW = ("log_set", "entropy", "varentropy")


def _as_steps(logits: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """(steps, batch, vocab) from a tuple of (batch, vocab) tensors or an already stacked tensor."""
    if isinstance(logits, torch.Tensor):
        stacked = logits
    elif isinstance(logits, Sequence) and all(isinstance(t, torch.Tensor) for t in logits):
        if not logits:
            raise ValueError(f"`{name}` is empty: there is no generated step")
        shapes = {tuple(t.shape) for t in logits}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"`{name}` must be (batch, vocab) tensors of one shape, got shapes {sorted(shapes)}")
        stacked = torch.stack(list(logits))
    else:
        raise ValueError(
            f"`{name}` must be a tuple of (batch, vocab) tensors (generate()'s output_logits/output_scores) "
            f"or a (steps, batch, vocab) tensor, got {type(logits).__name__}"
        )
    if stacked.dim() != 3:
        raise ValueError(f"`{name}` as a tensor must have shape (steps, batch, vocab), got {tuple(stacked.shape)}")
    if not stacked.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be floating point, got {stacked.dtype}")
    return stacked


def _check_lengths(lengths: Sequence[int] | None, steps: int, batch: int) -> list[int]:
    if lengths is None:
        return [steps] * batch
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    values = list(lengths)
    if len(values) != batch:
        raise ValueError(f"`lengths` must have one entry per row ({batch}), got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= steps:
            raise ValueError(f"`lengths` entries must be ints in [0, {steps}], got {values!r}")
    return values


def step_stats(
    logits: torch.Tensor | Sequence[torch.Tensor],
    token_id: int | list[int] | tuple[int, ...] | torch.Tensor,
    lengths: Sequence[int] | None = None,
) -> list[StepStats]:
    r"""Per-row statistics of a finished generation, from ``output_logits`` or ``output_scores``.

    ``output_logits`` give the model's own distribution (temperature 1, nothing masked); ``output_scores``
    give the distribution after every processor and warper, where top-k/top-p put most tokens at -inf, so
    the entropy is that of the truncated distribution and ``info`` is ``inf`` whenever EOS was cut.

    Args:
        logits (`tuple[torch.Tensor]` or `torch.Tensor`): one (batch, vocab) tensor per step, as returned by
            ``generate(..., return_dict_in_generate=True, output_logits=True)``, or their stack of shape
            (steps, batch, vocab).
        token_id (`int` or `list[int]`): the token set whose probability is followed, usually the EOS ids.
        lengths (`list[int]`, *optional*): keep only the first ``lengths[row]`` steps of each row, e.g. up
            to and including the step that produced EOS when rows of a batch finished early.

    Returns:
        `list[StepStats]`: one per row, in bits.

    Example:

    ```python
    >>> import math, torch
    >>> from perpetual_logits.analysis import step_stats
    >>> p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])   # EOS (id 0) has probability 1/2
    >>> stats = step_stats((p.log(),), token_id=0)[0]
    >>> [round(v, 4) for v in (stats.eos_prob[0], stats.info[0], stats.entropy[0], stats.varentropy[0])]
    [0.5, 1.0, 1.5, 0.25]

    ```
    """
    ids = _validation.eos_ids(token_id, "token_id")
    stacked = _as_steps(logits, "logits")
    steps, batch, vocab = stacked.shape
    if max(ids) >= vocab:
        raise ValueError(f"`token_id` {max(ids)} is outside the vocabulary of size {vocab}")
    keep = _check_lengths(lengths, steps, batch)
    check_distribution(stacked, "logits")
    flat = stacked.reshape(steps * batch, vocab)
    values = distribution_stats(flat, torch.tensor(ids, dtype=torch.long, device=flat.device))
    table = {name: v.reshape(steps, batch).T.tolist() for name, v in values.items()}
    return [StepStats(*(table[name][row][: keep[row]] for name in _NAMES)) for row in range(batch)]


def _block_means(values: Sequence[float], block_size: int, from_end: bool) -> list[float]:
    n = len(values)
    if from_end:
        # Blocks counted back from the last step: the *first* block is the short one.
        cuts = list(range(n, 0, -block_size))[::-1]
        starts = [max(0, c - block_size) for c in cuts]
        bounds = list(zip(starts, cuts, strict=True))
    else:
        bounds = [(s, min(s + block_size, n)) for s in range(0, n, block_size)]
    return [math.fsum(values[a:b]) / (b - a) for a, b in bounds]


@overload
def blockwise(stats: StepStats, block_size: int, from_end: bool = False) -> StepStats: ...
@overload
def blockwise(stats: Sequence[float], block_size: int, from_end: bool = False) -> list[float]: ...
def blockwise(stats: StepStats | Sequence[float], block_size: int, from_end: bool = False) -> StepStats | list[float]:
    """Means over blocks of ``block_size`` consecutive steps (the blog's figure 1).

    Blocks are counted from the first step and the last block may be shorter; a run shorter than one block
    gives a single block. With ``from_end=True`` blocks are counted back from the last step instead (the
    *first* block may be short), which lines runs of different lengths up at their end (at EOS).

    Args:
        stats (`StepStats` or `list[float]`): per-step statistics, or one list of values.
        block_size (`int`): steps per block, >= 1.
        from_end (`bool`, defaults to `False`): count blocks back from the last step.

    Returns:
        `StepStats` of block means (one entry per block) for a `StepStats`, else a `list[float]`. An empty
        run gives no blocks.

    Example:

    ```python
    >>> from perpetual_logits.analysis import blockwise
    >>> blockwise([1.0, 2.0, 3.0, 4.0, 5.0], 2)
    [1.5, 3.5, 5.0]
    >>> blockwise([1.0, 2.0, 3.0, 4.0, 5.0], 2, from_end=True)
    [1.0, 2.5, 4.5]

    ```
    """
    block_size = _validation.positive_int(block_size, "block_size")
    if not isinstance(from_end, bool):
        raise ValueError(f"`from_end` must be a bool, got {from_end!r}")
    if isinstance(stats, StepStats):
        return StepStats(*(_block_means(getattr(stats, name), block_size, from_end) for name in _NAMES))
    if isinstance(stats, (str, bytes)) or not isinstance(stats, Sequence):
        raise ValueError(f"`stats` must be a StepStats or a sequence of floats, got {type(stats).__name__}")
    return _block_means([float(v) for v in stats], block_size, from_end)


def aligned_means(runs: Sequence[Sequence[float]], from_end: bool = False) -> list[float]:
    """Mean over runs of entry ``i``, runs lined up at their start (or at their end with ``from_end``).

    Entry ``i`` averages the runs long enough to have it; non-finite values (the ``inf`` information content
    of a masked EOS) are left out, and an entry with no finite value is NaN.

    Args:
        runs (`list[list[float]]`): one list per run, e.g. block means from :func:`blockwise`.
        from_end (`bool`, defaults to `False`): right-align the runs, so the last entries line up.

    Example:

    ```python
    >>> from perpetual_logits.analysis import aligned_means
    >>> aligned_means([[1.0, 2.0, 3.0], [5.0]]), aligned_means([[1.0, 2.0, 3.0], [5.0]], from_end=True)
    ([3.0, 2.0, 3.0], [1.0, 2.0, 4.0])

    ```
    """
    longest = max((len(r) for r in runs), default=0)
    means = []
    for i in range(longest):
        column = []
        for run in runs:
            j = i - (longest - len(run)) if from_end else i
            if 0 <= j < len(run) and math.isfinite(run[j]):
                column.append(float(run[j]))
        means.append(math.fsum(column) / len(column) if column else math.nan)
    return means


class _Tokenizer(Protocol):
    def decode(self, token_ids: list[int], *args: Any, **kwargs: Any) -> str: ...


def token_label(tokenizer: _Tokenizer | None, token_id: int) -> str:
    r"""A readable one-line label for one token: newlines and tabs escaped (``\n``), blanks made visible.

    Args:
        tokenizer: anything with ``decode(list[int]) -> str`` (a transformers tokenizer).
        token_id (`int`): the token.

    Example:

    ```python
    >>> from perpetual_logits.analysis import token_label
    >>> class Vocab:
    ...     def decode(self, ids, **kwargs):
    ...         return ["a", "\n", " ", ""][ids[0]]
    >>> [token_label(Vocab(), i) for i in range(4)]
    ['a', '\\n', "' '", '<3>']

    ```
    """
    if tokenizer is None:  # no tokenizer: the id is the label
        return f"<{int(token_id)}>"
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if text == "":
        # Pieces such as sentencepiece's lone "▁" decode to nothing; fall back to the raw piece, then the id.
        to_tokens = getattr(tokenizer, "convert_ids_to_tokens", None)
        raw = to_tokens(int(token_id)) if callable(to_tokens) else None
        return raw if isinstance(raw, str) and raw.strip() else f"<{int(token_id)}>"
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return repr(escaped) if escaped.strip() == "" else escaped


@dataclass
class WindowStep:
    """The top-k of one step's distribution (one panel of the blog's figures 2 and 3).

    Attributes:
        step (`int`): generated step index (0 = first generated token).
        offset (`int`): position relative to the run's last step (``-1`` = the last step, e.g. the one that
            produced EOS).
        token_ids (`list[int]`): the k most probable ids, most probable first.
        tokens (`list[str]`): their labels (:func:`token_label`: newline shown as ``\\n``).
        probs (`list[float]`): their probabilities.
    """

    step: int
    offset: int
    token_ids: list[int]
    tokens: list[str]
    probs: list[float]

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, e.g. for JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def eos_window(
    scores: torch.Tensor | Sequence[torch.Tensor],
    tokenizer: _Tokenizer | None,
    k: int = 10,
    last: int = 5,
    row: int = 0,
    length: int | None = None,
) -> list[WindowStep]:
    r"""Top-``k`` tokens and probabilities at each of the last ``last`` steps of one row (figures 2 and 3).

    For a run that ended with EOS the final entry is the step that produced EOS and the earlier ones show
    what EOS competed with on the way there (often ``\n``).

    Args:
        scores (`tuple[torch.Tensor]` or `torch.Tensor`): as in :func:`step_stats`.
        tokenizer: anything with ``decode(list[int]) -> str`` (a transformers tokenizer), for the labels;
            ``None`` labels tokens by id (``<17>``).
        k (`int`, defaults to 10): tokens per step, >= 1 (capped at the vocabulary size).
        last (`int`, defaults to 5): steps to show, >= 1 (fewer when the run is shorter).
        row (`int`, defaults to 0): which row of the batch.
        length (`int`, *optional*): the row's number of steps when it finished before the others (e.g. the
            index of its EOS step + 1); defaults to every step.

    Returns:
        `list[WindowStep]`, oldest step first.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.analysis import eos_window
    >>> class Vocab:
    ...     def decode(self, ids, **kwargs):
    ...         return ["<eos>", "\n", "cat", "."][ids[0]]
    >>> steps = (torch.tensor([[0.1, 0.6, 0.1, 0.2]]).log(), torch.tensor([[0.7, 0.2, 0.05, 0.05]]).log())
    >>> window = eos_window(steps, Vocab(), k=2, last=5)
    >>> [(w.offset, w.tokens) for w in window]
    [(-2, ['\\n', '.']), (-1, ['<eos>', '\\n'])]
    >>> [round(p, 2) for p in window[-1].probs]
    [0.7, 0.2]

    ```
    """
    k = _validation.positive_int(k, "k")
    last = _validation.positive_int(last, "last")
    stacked = _as_steps(scores, "scores")
    steps, batch, vocab = stacked.shape
    _validation.positive_int(row, "row", minimum=0, maximum=batch - 1)
    if tokenizer is not None:
        _validation.has_decode(tokenizer)
    end = steps if length is None else _check_lengths([length], steps, 1)[0]
    start = max(0, end - last)
    window = stacked[start:end, row]
    check_distribution(window, "scores")
    probs = torch.softmax(window.float(), dim=-1)
    top = probs.topk(min(k, vocab), dim=-1)
    result = []
    for i, (values, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        step = start + i
        result.append(
            WindowStep(
                step=step,
                offset=step - end,
                token_ids=ids,
                tokens=[token_label(tokenizer, t) for t in ids],
                probs=values,
            )
        )
    return result
