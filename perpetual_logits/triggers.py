"""Early triggers: act *before* EOS is sampled (the blog's "looking ahead").

The blog's block-wise analysis shows the EOS probability rising and the entropy falling in the steps before
a model stops. :class:`EarlyTrigger` watches both per row and fires when

* the row's EOS probability, averaged over its last ``window`` steps, reaches ``eos_threshold``; or
* its entropy trend falls: the least-squares slope of its last ``window`` entropies (bits per step) is
  ``-entropy_slope`` or steeper.

A caller (the Method 2 processor, the backstep loop) starts its temperature schedule when a row fires.
"""

from __future__ import annotations

import torch

from . import _validation
from .distributions import distribution_stats
from .protocol import RowState

#: The longest history window: far beyond any useful trigger, small enough that its buffers stay tiny.
_MAX_WINDOW = 1 << 16

__all__ = ["EarlyTrigger"]


class EarlyTrigger(RowState):
    r"""Per-row early trigger on the EOS probability and the entropy trend. Pure torch, no host sync.

    Each :meth:`update` adds one step per row and returns, per row, whether it fires at that step. A row can
    only fire once it has ``window`` steps of history, and firing clears its history: after firing, a row
    must see ``window`` new steps before it can fire again (the cool-down). A rewind drops a row's last steps;
    it never makes a row fire sooner.

    It follows the :class:`~perpetual_logits.RowState` protocol: :meth:`start` begins a generation of rows
    that are ``prompt_length`` tokens long, each :meth:`update` observes the distribution of every row's next
    position (a row then holds one token more), and :meth:`rewind` ``(row, length)`` says the row holds
    ``length`` tokens again: the steps observed for positions ``>= length`` are dropped. :meth:`drop_steps`
    drops a number of steps instead, for a trigger used on its own.

    Definitions, over the row's last ``window`` steps ``y_0 .. y_{w-1}`` (oldest first):

    * mean EOS probability: ``sum(p_i) / w``; fires when ``>= eos_threshold``;
    * entropy slope: the least-squares slope of ``H_i`` against ``i``,
      ``sum((i - m) (H_i - mean H)) / sum((i - m)^2)`` with ``m = (w - 1) / 2``, in bits per step; fires when
      ``<= -entropy_slope``.

    Without :meth:`start`, the first :meth:`update` starts a generation by itself, as does an update with
    another batch size (then only :meth:`drop_steps` can cut rows back: their lengths are unknown). The state
    moves to the device of the updates. NaN inputs count as 0.

    Args:
        window (`int`, defaults to 8): steps averaged, and the cool-down; >= 1 (>= 2 with ``entropy_slope``).
        eos_threshold (`float`, *optional*, defaults to 0.1): mean EOS probability that fires, in (0, 1];
            ``None`` disables this test.
        entropy_slope (`float`, *optional*): entropy fall, in bits per step (> 0), that fires; ``None``
            (default) disables this test.

    Attributes:
        mean_eos_prob (`torch.Tensor` of shape `(batch,)`): the mean EOS probability at the latest update (over
            the steps available); ``None`` before the first update of a generation.
        slope (`torch.Tensor` of shape `(batch,)`): the entropy slope at the latest update, bits/step (0 until the
            window is full); ``None`` before the first update of a generation.

    Example:

    ```python
    >>> import torch
    >>> from perpetual_logits.triggers import EarlyTrigger
    >>> trigger = EarlyTrigger(window=3, eos_threshold=0.2)
    >>> flat = torch.zeros(2)
    >>> for p in [0.0, 0.1, 0.3, 0.4, 0.4, 0.4, 0.4]:   # row 0 rises, row 1 stays at 0
    ...     fired = trigger.update(torch.tensor([p, 0.0]), flat)
    ...     print(fired.tolist())
    [False, False]
    [False, False]
    [False, False]
    [True, False]
    [False, False]
    [False, False]
    [True, False]

    ```
    """

    def __init__(
        self,
        window: int = 8,
        eos_threshold: float | None = 0.1,
        entropy_slope: float | None = None,
    ) -> None:
        # -- settings
        self.window = _validation.positive_int(window, "window", maximum=_MAX_WINDOW)
        if eos_threshold is not None:
            eos_threshold = _validation.probability(eos_threshold, "eos_threshold")
        if entropy_slope is not None:
            entropy_slope = _validation.positive_float(entropy_slope, "entropy_slope")
            if self.window < 2:
                raise ValueError(f"`window` must be an int >= 2 when `entropy_slope` is set, got {window!r}")
        if eos_threshold is None and entropy_slope is None:
            raise ValueError("at least one of `eos_threshold` and `entropy_slope` must be set (not None)")
        self.eos_threshold = eos_threshold
        self.entropy_slope = entropy_slope
        # Least-squares weights: slope = history @ weights once the window is full (x = 0 .. w-1).
        x = torch.arange(self.window, dtype=torch.float32)
        centred = x - x.mean()
        denominator = centred.square().sum()
        self._weights = centred / denominator if self.window >= 2 else torch.zeros(1)
        # -- per row: the last `window` steps (newest last) and how many of them are history; empty until started
        self._eos = torch.zeros(0, self.window)
        self._entropy = torch.zeros(0, self.window)
        self._valid = torch.zeros(0, dtype=torch.long)  # steps of history, at most `window`
        # -- per row: its length (tokens, prompt included) = prompt + updates - behind[row]; None: unknown
        self._prompt_length: int | None = None
        self._updates = 0
        self._behind: list[int] = []
        # -- the latest update's measures (see Attributes)
        self.mean_eos_prob: torch.Tensor | None = None
        self.slope: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"EarlyTrigger(window={self.window}, eos_threshold={self.eos_threshold}, "
            f"entropy_slope={self.entropy_slope})"
        )

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int, device: torch.device | str | None = None) -> None:
        """Begin a generation of ``batch_size`` rows of ``prompt_length`` tokens, without history.

        Args:
            batch_size: rows.
            prompt_length: tokens each row holds before its first update.
            device: where the state lives (default: the CPU; it moves to the device of the updates).
        """
        batch = _validation.positive_int(batch_size, "batch_size", minimum=0)
        device = torch.device("cpu") if device is None else torch.device(device)
        self._eos = torch.zeros(batch, self.window, device=device)
        self._entropy = torch.zeros(batch, self.window, device=device)
        self._valid = torch.zeros(batch, dtype=torch.long, device=device)
        self._weights = self._weights.to(device)
        self._prompt_length = _validation.positive_int(prompt_length, "prompt_length", minimum=0)
        self._updates = 0
        self._behind = [0] * batch
        self.mean_eos_prob = None
        self.slope = None

    def rewind(self, row: int, length: int) -> None:
        """Row ``row`` holds ``length`` tokens again: drop the steps it observed for positions ``>= length``.

        Needs the rows' lengths, i.e. :meth:`start` before the first update (see :meth:`drop_steps`).
        """
        if self._prompt_length is None:
            raise RuntimeError(
                "rewind(row, length) needs the rows' lengths: call start(batch_size, prompt_length) before the "
                "first update(), or cut a row back by a number of steps with drop_steps(row, n_steps)"
            )
        self._check_row(row)
        length = _validation.positive_int(length, "length", minimum=0)
        current = self._prompt_length + self._updates - self._behind[row]
        if length < current:
            self.drop_steps(row, current - length)

    def reset(self) -> None:
        """Forget every row's history; the next :meth:`start` or :meth:`update` begins a new generation."""
        self.start(0, 0)
        self._prompt_length = None

    @property
    def started(self) -> bool:
        """A generation has begun (:meth:`start` or an :meth:`update`) since the last :meth:`reset`."""
        return self._eos.shape[0] > 0

    # -- steps ---------------------------------------------------------------------------------------------
    def update(self, eos_prob: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """Add one step to every row; return (batch,) bool: the rows that fire now.

        Args:
            eos_prob (`torch.Tensor` of shape `(batch,)`): each row's EOS probability at this step.
            entropy (`torch.Tensor` of shape `(batch,)`, *optional*): each row's entropy, in bits. Required
                when ``entropy_slope`` is set.

        Returns:
            `torch.BoolTensor` of shape `(batch,)`.
        """
        if not isinstance(eos_prob, torch.Tensor) or eos_prob.dim() != 1:
            raise ValueError(f"`eos_prob` must be a tensor of shape (batch,), got {_shape(eos_prob)}")
        if entropy is None:
            if self.entropy_slope is not None:
                raise ValueError("`entropy` is required (shape (batch,), bits) when `entropy_slope` is set")
            entropy = torch.zeros_like(eos_prob)
        elif not isinstance(entropy, torch.Tensor) or entropy.shape != eos_prob.shape:
            raise ValueError(
                f"`entropy` must be a tensor with the shape of `eos_prob` {tuple(eos_prob.shape)}, "
                f"got {_shape(entropy)}"
            )
        batch, device = eos_prob.shape[0], eos_prob.device
        if self._eos.shape[0] != batch:  # not started, or another batch: a new generation of unknown lengths
            self.start(batch, 0, device)
            self._prompt_length = None
        elif self._eos.device != device:
            self._move(device)
        p = eos_prob.detach().float().nan_to_num(0.0)
        h = entropy.detach().float().to(device).nan_to_num(0.0)
        self._eos = torch.cat([self._eos[:, 1:], p[:, None]], dim=1)
        self._entropy = torch.cat([self._entropy[:, 1:], h[:, None]], dim=1)
        self._valid = (self._valid + 1).clamp_max(self.window)
        self._updates += 1
        full = self._valid >= self.window

        # Entries older than a row's history are zero, so the sum over the window is the sum over its history.
        self.mean_eos_prob = self._eos.sum(1) / self._valid.clamp_min(1)
        self.slope = torch.where(full, self._entropy @ self._weights, torch.zeros_like(h))
        fired = torch.zeros_like(full)
        if self.eos_threshold is not None:
            fired = fired | (self.mean_eos_prob >= self.eos_threshold)
        if self.entropy_slope is not None:
            fired = fired | (self.slope <= -self.entropy_slope)
        fired = fired & full
        # Cool-down: a row that fires starts a fresh window.
        keep = (~fired)[:, None]
        self._eos = self._eos * keep
        self._entropy = self._entropy * keep
        self._valid = torch.where(fired, torch.zeros_like(self._valid), self._valid)
        return fired

    def update_from_scores(self, scores: torch.Tensor, eos_token_id: int | list[int] | torch.Tensor) -> torch.Tensor:
        """:meth:`update` from a step's scores (batch, vocab): computes the EOS probability and entropy.

        Both are those of ``softmax(scores)``, i.e. of whatever distribution the caller passes (a
        ``LogitsProcessor`` sees it before temperature and top-k/top-p).
        """
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.dtype.is_floating_point:
            raise ValueError(f"`scores` must be a float tensor of shape (batch, vocab), got {_shape(scores)}")
        ids = _validation.eos_ids(eos_token_id)
        if max(ids) >= scores.shape[-1]:
            raise ValueError(f"`eos_token_id` {max(ids)} is outside the vocabulary of size {scores.shape[-1]}")
        eos = torch.tensor(ids, dtype=torch.long, device=scores.device)
        stats = distribution_stats(scores, eos)
        return self.update(stats["eos_prob"], stats["entropy"])

    def drop_steps(self, row: int, n_steps: int) -> None:
        """Drop the last ``n_steps`` steps of row ``row`` (its tokens were removed): the row then needs that many
        new steps before its window is full again. :meth:`rewind` says the same by the row's new length."""
        if not self.started:
            raise RuntimeError("drop_steps() called before the first update()")
        self._check_row(row)
        n = _validation.positive_int(n_steps, "n_steps", minimum=0)
        if n == 0:
            return
        self._behind[row] += n
        n = min(n, self.window)
        # Shift the row right by n: its newest n steps fall off, zeros (no history) come in on the left.
        for buffer in (self._eos, self._entropy):
            kept = buffer[row, : self.window - n].clone()
            buffer[row] = 0.0
            buffer[row, n:] = kept
        self._valid[row] = (self._valid[row] - n).clamp_min(0)

    # -- helpers -------------------------------------------------------------------------------------------
    def _check_row(self, row: int) -> None:
        if not self.started:
            raise RuntimeError("rewind() called before start() or the first update()")
        _validation.positive_int(row, "row", minimum=0, maximum=self._eos.shape[0] - 1)

    def _move(self, device: torch.device) -> None:
        self._eos = self._eos.to(device)
        self._entropy = self._entropy.to(device)
        self._valid = self._valid.to(device)
        self._weights = self._weights.to(device)


def _shape(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
