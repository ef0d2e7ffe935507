"""Context shift: a row writes on past the model's window while its cache holds at most the window.

When a row is about to feed a token at position ``limit`` (the model's ``max_position_embeddings``, or a smaller
limit), the row keeps its first ``keep`` text tokens (the *head*: the prompt's instructions, a chat system turn)
and its most recent tokens, and drops ``discard`` tokens in between. The returned sequence keeps every token;
only the cache forgets. Two ways to rebuild the row's cache:

* ``"reprefill"`` (default): the kept tokens are fed again, alone, into a fresh cache (one forward of
  ``limit - discard`` tokens per shift) and copied into the row's slots. Exact: what follows is what a forward
  over the kept text alone gives.
* ``"rerotate"`` (llama.cpp's context shift): the recent tokens' cached keys are moved ``discard`` slots left and
  their rotary embedding is turned back by ``discard`` positions; no forward. Cheaper, but above the first
  layer the kept states were computed while the dropped tokens were still in view (exact only for one layer).

Bookkeeping. Token ``i`` of a row (index in the returned sequence, prompt padding included) sits in cache slot
``i - dropped[row]`` once ``i`` is past the head; :class:`~perpetual_logits.backstep.cache.CacheLayout` maps
tokens to slots and positions with that count. A rewind never reaches across a shift: it is clamped to one token
after the first kept recent token (:meth:`ContextWindow.floor`), so the re-fed token of a deep rewind is always
still in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import _compat, _validation
from ..protocol import RowState
from .cache import CacheLayout

__all__ = ["ContextShift", "ContextWindow", "model_window"]

_METHODS = ("reprefill", "rerotate")


@dataclass(frozen=True)
class ContextShift:
    """Settings of the context shift, passed as ``BackstepConfig(window=ContextShift(...))``.

    Args:
        keep (`int` or `"prompt"`, defaults to `"prompt"`): text tokens at the start of each row that are never
            dropped (BOS included, left padding not counted). ``"prompt"`` keeps each row's whole prompt.
        discard (`int`, *optional*): tokens dropped per shift. Defaults to half of what lies between the head
            and the limit (llama.cpp's rule), so a shift happens every ``discard`` tokens.
        limit (`int`, *optional*): the most positions a row may use. Defaults to the model's
            ``max_position_embeddings``; a larger value is refused.
        method (`str`, defaults to `"reprefill"`): ``"reprefill"`` (exact, one forward of the kept tokens per
            shift) or ``"rerotate"`` (moves cached keys by re-applying the rotary embedding; rotary models only).

    Example:

    ```python
    >>> from perpetual_logits import ContextShift
    >>> ContextShift(keep=4, discard=128).method
    'reprefill'
    >>> ContextShift(keep=-1)
    Traceback (most recent call last):
    ...
    ValueError: `keep` must be 'prompt' or an int >= 0, got -1

    ```
    """

    keep: int | Literal["prompt"] = "prompt"
    discard: int | None = None
    limit: int | None = None
    method: Literal["reprefill", "rerotate"] = "reprefill"

    def __post_init__(self) -> None:
        if self.keep != "prompt" and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0):
            raise ValueError(f"`keep` must be 'prompt' or an int >= 0, got {self.keep!r}")
        if self.discard is not None:
            _validation.positive_int(self.discard, "discard")
        if self.limit is not None:
            _validation.positive_int(self.limit, "limit", minimum=4)
        if self.method not in _METHODS:
            raise ValueError(f"`method` must be 'reprefill' or 'rerotate', got {self.method!r}")


def model_window(model: Any) -> int | None:
    """The model's context window (``max_position_embeddings`` of its text config), when it declares one."""
    config = model.config.get_text_config()
    window = getattr(config, "max_position_embeddings", None)
    return int(window) if isinstance(window, int) and window > 0 else None


class ContextWindow(RowState):
    """Drops the middle of rows that reach the limit, before the forward that would pass it.

    Args:
        settings: the :class:`ContextShift`.
        model: the model (its window, its forward for ``"reprefill"``, its rotary frequencies for ``"rerotate"``).
        text_start: per row, the index of its first text token (after left padding).
        prompt_length: prompt tokens, padding included.
        cache_key: the model kwarg that carries the cache.
    """

    def __init__(
        self, settings: ContextShift, model: Any, text_start: list[int], prompt_length: int, cache_key: str
    ) -> None:
        # -- settings, resolved against the model and the prompt
        self.model = model
        self.method = settings.method
        self.cache_key = cache_key
        window = model_window(model)
        if settings.limit is not None and window is not None and settings.limit > window:
            raise ValueError(
                f"`limit` ({settings.limit}) must not exceed the model's window (max_position_embeddings {window})"
            )
        limit = settings.limit if settings.limit is not None else window
        if limit is None:
            raise ValueError("ContextShift needs a `limit`: the model's config declares no max_position_embeddings")
        self.limit = limit
        self.text_start = list(text_start)
        prompt_text = [prompt_length - s for s in text_start]
        # A head longer than a row's prompt takes that row's first generated tokens too.
        keeps = prompt_text if settings.keep == "prompt" else [int(settings.keep)] * len(text_start)
        self.keep = keeps
        room = limit - max(keeps, default=0)
        discard = settings.discard if settings.discard is not None else room // 2
        if room < 4 or not 1 <= discard <= room - 2:
            raise ValueError(
                f"ContextShift: with `limit` {limit} and a head of {max(keeps, default=0)} tokens (`keep`), `discard` "
                f"must be in [1, {room - 2}] (got {discard}); keep fewer tokens or raise the limit"
            )
        self.discard = discard
        self.inv_freq = _compat.rotary_inv_freq(model) if self.method == "rerotate" else None
        # -- per row
        self.dropped: list[int] = []
        self.shifts = 0
        self.prefill_tokens = 0

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int) -> None:
        self.dropped = [0] * batch_size
        self.shifts = 0
        self.prefill_tokens = 0

    def rewind(self, row: int, length: int) -> None:
        """Rewinds are clamped to :meth:`floor` before they happen; nothing to undo here."""

    # -- queries -------------------------------------------------------------------------------------------
    def head_end(self, row: int) -> int:
        """Index of the first token after the row's head."""
        return self.text_start[row] + self.keep[row]

    def floor(self, row: int) -> int:
        """The shortest length a rewind may leave: one token after the first kept recent token (0 before any
        shift), so the token a deep rewind feeds again is still in the cache."""
        if not self.dropped[row]:
            return 0
        return self.head_end(row) + self.dropped[row] + 1

    # -- the shift -----------------------------------------------------------------------------------------
    def shift_if_needed(self, layout: CacheLayout, ids: list[list[int]], feeding: dict[int, int]) -> None:
        """Shift every row whose token about to be fed (``feeding[row]``, its index) would sit at ``limit``."""
        for row, index in feeding.items():
            if layout.position(row, index) >= self.limit:
                self._shift(layout, row, ids[row], index)

    def _shift(self, layout: CacheLayout, row: int, ids: list[int], newest: int) -> None:
        # The cache holds tokens [text_start, newest) of the row (minus what earlier shifts dropped); afterwards it
        # holds the head and tokens [head + dropped, newest).
        head = self.head_end(row)
        before = self.dropped[row]
        after = before + self.discard
        kept = ids[self.text_start[row] : head] + ids[head + after : newest]
        text_slot = self.text_start[row] + layout.prefix  # slot of the row's first text token
        if self.method == "rerotate":
            self._rerotate(layout, row, head - self.text_start[row], newest - head - after)
        layout.dropped[row] = after
        layout.target[row] = min(layout.target[row], layout.prefix + newest - after)
        layout.realign(tight=True)  # the narrowest layout: the cache width stays within the window
        self.dropped[row] = after
        if self.method == "reprefill":
            keys, values = self._prefill(kept)
            start = layout.width - (layout.target[row] - text_slot)
            for layer, k, v in zip(_compat.cache_layers(layout.cache), keys, values):
                layer.keys[row, :, start : start + len(kept)] = k
                layer.values[row, :, start : start + len(kept)] = v
            self.prefill_tokens += len(kept)
        self.shifts += 1

    def _prefill(self, kept: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The kept tokens fed alone into a fresh cache, positions from 0: per layer, keys and values."""
        device = next(self.model.parameters()).device
        tokens = torch.tensor([kept], dtype=torch.long, device=device)
        positions = torch.arange(len(kept), device=device)[None]
        fresh = _compat.fresh_cache(self.model)
        self.model(
            input_ids=tokens, position_ids=positions, use_cache=True, logits_to_keep=1, **{self.cache_key: fresh}
        )
        layers = _compat.cache_layers(fresh)
        return [layer.keys[0] for layer in layers], [layer.values[0] for layer in layers]

    def _rerotate(self, layout: CacheLayout, row: int, head: int, recent: int) -> None:
        """Move the ``recent`` newest cached tokens ``discard`` slots left, turning their keys back as many
        positions; applied before the layout drops the freed slots."""
        assert self.inv_freq is not None
        offset = layout.width - layout.content[row] + self.text_start[row] + layout.prefix
        dest = offset + head  # where the first recent token goes: right after the head
        source = dest + self.discard
        for layer in _compat.cache_layers(layout.cache):
            keys = layer.keys[row, :, source : source + recent].clone()
            layer.keys[row, :, dest : dest + recent] = _compat.rotate_keys(keys, -self.discard, self.inv_freq)
            layer.values[row, :, dest : dest + recent] = layer.values[row, :, source : source + recent].clone()
