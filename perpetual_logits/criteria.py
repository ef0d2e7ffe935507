"""Guards for long runs, as per-row ``StoppingCriteria`` usable with plain ``generate()`` and backstep generation.

* :class:`RepetitionLoopCriteria` stops a row caught in a loop (its last tokens are one span repeated).
* :class:`EvictionBudgetCriteria` stops a row after K evictions or backsteps, so that a row which keeps
  trying to end is not forced on forever.

transformers 5 calls a criterion after each new token with the whole ``input_ids`` (batch, length) and
expects a bool tensor (batch,): ``True`` marks a row finished (``generate()`` pads it from then on).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from transformers import StoppingCriteria

from . import _validation

__all__ = ["EventSource", "EvictionBudgetCriteria", "RepetitionLoopCriteria"]


class RepetitionLoopCriteria(StoppingCriteria):
    r"""Stop a row whose last tokens are the same span repeated back to back: a loop.

    A row stops when, for some span length ``p`` with ``min_span <= p <= max_span``, its last
    ``p * repeats`` tokens are ``repeats`` copies of one span of ``p`` tokens. A run of one repeated token
    counts too (it is periodic for every ``p``), e.g. ``"\n"`` written ``2 * repeats`` times with
    ``min_span=2``.

    The check is one vectorised comparison over the last ``max_span * repeats`` tokens of all rows, with no
    host sync: cheap enough for every step.

    Args:
        min_span (`int`, defaults to 2): shortest repeated span, in tokens; >= 1. The default ignores the
            short stutters of ordinary prose ("very, very, very").
        max_span (`int`, defaults to 32): longest repeated span, in tokens; >= ``min_span``.
        repeats (`int`, defaults to 3): how many copies back to back make a loop; >= 2.
        prompt_length (`int`, *optional*): tokens of the prompt; only tokens after it are examined, so a
            repetitive prompt cannot stop a row. ``None``: the whole sequence is examined.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.criteria import RepetitionLoopCriteria
    >>> loop = RepetitionLoopCriteria(min_span=2, max_span=4, repeats=3)
    >>> ids = torch.tensor([[9, 5, 6, 7, 5, 6, 7, 5, 6, 7],    # (5, 6, 7) three times
    ...                     [9, 5, 6, 7, 5, 6, 7, 5, 6, 8]])   # broken at the end
    >>> loop(ids, None)
    tensor([ True, False])

    ```
    """

    def __init__(
        self, min_span: int = 2, max_span: int = 32, repeats: int = 3, prompt_length: int | None = None
    ) -> None:
        self.min_span = _validation.positive_int(min_span, "min_span")
        self.max_span = _validation.positive_int(max_span, "max_span", minimum=self.min_span)
        self.repeats = _validation.positive_int(repeats, "repeats", minimum=2)
        if prompt_length is not None:
            prompt_length = _validation.positive_int(prompt_length, "prompt_length", minimum=0)
        self.prompt_length = prompt_length
        self._index_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"RepetitionLoopCriteria(min_span={self.min_span}, max_span={self.max_span}, "
            f"repeats={self.repeats}, prompt_length={self.prompt_length})"
        )

    def _indices(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a tail of ``n`` tokens: spans (P,), earlier-index table (P, n) and the mask of checked pairs."""
        key = (n, device)
        cached = self._index_cache.get(key)
        if cached is None:
            spans = torch.arange(self.min_span, self.max_span + 1, device=device)
            j = torch.arange(n, device=device)
            earlier = (j[None, :] - spans[:, None]).clamp_min(0)
            # Span p repeats r times over the last p*r tokens iff token j equals token j-p for each of the
            # last p*(r-1) positions j.
            checked = j[None, :] >= n - spans[:, None] * (self.repeats - 1)
            cached = (spans, earlier, checked)
            self._index_cache[key] = cached
        return cached

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {getattr(input_ids, 'shape', None)}")
        batch, length = input_ids.shape
        start = 0 if self.prompt_length is None else min(self.prompt_length, length)
        available = length - start
        longest = min(self.max_span, available // self.repeats)  # spans that fit in the examined tokens
        if longest < self.min_span:
            return torch.zeros(batch, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
        n = longest * self.repeats
        tail = input_ids[:, length - n :]
        _, earlier, checked = self._indices(n, input_ids.device)
        k = longest - self.min_span + 1  # the spans that fit
        same = tail[:, None, :] == tail[:, earlier[:k]]  # (batch, k, n)
        looped = (same | ~checked[:k]).all(-1)  # (batch, k)
        return looped.any(-1)  # type: ignore[return-value]


@runtime_checkable
class EventSource(Protocol):
    """Anything that counts events (evictions, backsteps) per row.

    :class:`EvictionBudgetCriteria` accepts an object with this method, or, failing that, one with an
    ``evictions`` attribute that lists each row's event steps (like
    :attr:`PostEOSResamplingLogitsProcessor.evictions`).
    """

    def event_counts(self, batch_size: int) -> list[int]:
        """Events so far per row, ``batch_size`` ints (zeros before the first step)."""
        ...


class EvictionBudgetCriteria(StoppingCriteria):
    r"""Stop a row after ``max_events`` evictions or backsteps: a budget that guarantees termination.

    Counts come from ``source``, read at every step:

    * an object with ``event_counts(batch_size) -> list[int]`` (the :class:`EventSource` protocol), or
    * an object with an ``evictions`` property listing each row's event steps, such as
      :class:`~perpetual_logits.PostEOSResamplingLogitsProcessor` (an empty list means no events yet).

    A row stops right after the token that follows its ``max_events``-th event (with Method 2: the token
    that replaced the evicted EOS), since criteria run after each token is chosen.

    Args:
        source (`EventSource` or an object with ``evictions``): where the per-row counts come from.
        max_events (`int`): events a row may have before it stops; >= 1.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.criteria import EvictionBudgetCriteria
    >>> class Counts:
    ...     def __init__(self):
    ...         self.counts = [0, 0]
    ...     def event_counts(self, batch_size):
    ...         return self.counts
    >>> source = Counts()
    >>> budget = EvictionBudgetCriteria(source, max_events=2)
    >>> ids = torch.zeros(2, 5, dtype=torch.long)
    >>> source.counts = [2, 1]
    >>> budget(ids, None)
    tensor([ True, False])

    ```
    """

    def __init__(self, source: Any, max_events: int) -> None:
        if not isinstance(source, EventSource) and not hasattr(source, "evictions"):
            raise ValueError(
                "`source` must have an event_counts(batch_size) -> list[int] method or an `evictions` "
                f"property (a list per row), got {type(source).__name__}"
            )
        self.source = source
        self.max_events = _validation.positive_int(max_events, "max_events")

    def __repr__(self) -> str:
        return f"EvictionBudgetCriteria(source={type(self.source).__name__}, max_events={self.max_events})"

    def counts(self, batch_size: int) -> list[int]:
        """Per-row event counts read from the source (zeros when it has not seen a step yet)."""
        if isinstance(self.source, EventSource):
            counts = [int(c) for c in self.source.event_counts(batch_size)]
        else:
            per_row = self.source.evictions
            counts = [len(steps) for steps in per_row] if per_row else [0] * batch_size
        if len(counts) != batch_size:
            raise ValueError(f"`source` reported counts for {len(counts)} rows, but the batch has {batch_size} rows")
        return counts

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {getattr(input_ids, 'shape', None)}")
        counts = torch.tensor(self.counts(input_ids.shape[0]), device=input_ids.device)
        return counts >= self.max_events  # type: ignore[return-value]
