"""The KV cache of a backstep batch: every row right-aligned, no holes, no longer than plain ``generate()``'s.

Layout. The cache is a rectangle of ``width`` slots per row. Row ``b`` owns its last ``content[b]`` slots; the
slots before them are padding, masked out (as ``generate()`` itself left-pads a batch). Every active row's
newest slot is the last one, so one new column serves the whole batch, a static cache keeps one shared fill
level, and ``torch.compile`` sees the shapes it always sees.

Rewind. Cutting row ``b`` back keeps the first slots of its content. Before the next forward the layout is
*realigned*: the new width is the longest row's content, and every row whose padding changed is moved by one
gather per layer (at batch size 1 nothing moves: the cache is simply cropped). So each row's kept tokens
occupy the cache exactly once, the width never exceeds ``prompt + max_new_tokens``, and memory does not grow
with rewinds.

Finished rows take part in later forwards with a masked padding slot (their tokens stay where they are);
those padding slots are dropped at the next realignment and at the end.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _compat
from ..protocol import RowState

__all__ = ["CacheLayout", "check_cache", "check_static_size"]


def check_cache(cache: Any) -> None:
    """Refuse caches that cannot be rewound exactly."""
    if cache is None:
        raise ValueError("backstep generation needs a KV cache: do not pass use_cache=False")
    for layer in _compat.cache_layers(cache):
        name = type(layer).__name__
        if "Quantized" in name:
            raise ValueError(
                f"backstep generation cannot rewind a quantized cache ({name}): its entries cannot be moved. "
                "Use the default DynamicCache or a StaticCache."
            )
        if getattr(layer, "is_linear", False) or "Linear" in name:
            raise ValueError(
                f"backstep generation cannot rewind {name}: recurrent/linear-attention state has no per-token "
                "entries to remove."
            )
        if _compat.is_static_layer(layer) and getattr(layer, "is_sliding", False):
            raise ValueError(
                f"backstep generation cannot rewind {name}: a static sliding-window layer rolls its slots. "
                "Use the default DynamicCache for sliding-window models."
            )


def check_static_size(static: list[int], slots: int, batch: int) -> None:
    """Refuse, before any token is generated, a fixed-size cache the run could outgrow.

    ``static``: the ``max_cache_len`` of each fixed-size layer; ``slots``: prompt + max_new_tokens. One row
    never feeds its last token (``slots - 1``, what stock ``generate()`` allocates). In a batch a row that
    reached max_new_tokens keeps its slots while a rewound row still writes, and that row's new slot is one more
    column for every row.
    """
    needed = slots - 1 if batch == 1 else slots
    if static and min(static) < needed:
        raise ValueError(
            f"backstep generation needs a StaticCache with max_cache_len >= {needed} (prompt + max_new_tokens"
            f"{' - 1' if batch == 1 else ', one slot more than stock generate() in a batch'}), got {min(static)}; "
            'pass a larger one or let generate() build it (cache_implementation="static")'
        )


def sliding_window(config: Any) -> int | None:
    """The attention window of a model config, when some of its layers use one."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    uses_sliding = layer_types is None or any("sliding" in str(t) for t in layer_types)
    if isinstance(window, int) and window > 0 and uses_sliding:
        return window
    return None


class CacheLayout(RowState):
    """Owns the cache's slot layout, the attention mask and the position of every fed token.

    Slots are counted per row from its first prompt slot: slot ``e`` of row ``b`` holds token ``e - prefix``
    (``prefix`` is non-zero only when the prompt was given as ``inputs_embeds``, which has no token ids), or, past
    the head of a row whose middle a context shift dropped, token ``e - prefix + dropped[b]``.

    Args:
        cache: the transformers ``Cache`` filled by the prompt forward.
        prompt_mask: the prompt's attention mask (batch, slots), or ``None`` for no padding.
        prompt_length: prompt tokens in ``input_ids`` (0 with ``inputs_embeds``).
        capacity: the most slots a row may use (``max_length``; the window for sliding-window layers).
    """

    def __init__(
        self, cache: Any, prompt_mask: torch.Tensor | None, prompt_length: int, capacity: int, device: torch.device
    ) -> None:
        # -- the cache and its shape
        self.cache = cache
        self.device = device
        self.width = int(cache.get_seq_length())
        self.capacity = capacity
        self.batch = 0
        # -- per row: slots owned (content), of which trailing padding slots (finished rows), slot shift
        self.prefix = self.width - prompt_length
        self.content: list[int] = []
        self.pads: list[int] = []
        self.target: list[int] = []  # content to keep at the next realignment
        self.dropped: list[int] = []  # tokens a context shift removed after the row's head (see window.py)
        # -- mask and positions
        self.mask: torch.Tensor | None = None
        self.padded = prompt_mask is not None
        self.prompt_mask = prompt_mask
        self.prompt_positions: list[list[int]] = []
        self.valid_prompt: list[int] = []
        # -- counters
        self.realignments = 0
        self.peak_width = self.width

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int) -> None:
        self.batch = batch_size
        self.content = [self.width] * batch_size
        self.pads = [0] * batch_size
        self.target = list(self.content)
        self.dropped = [0] * batch_size
        if self.prompt_mask is not None:
            mask = self.prompt_mask.to(self.device, torch.long)
            self.mask = mask.clone()
            self.prompt_positions = (mask.cumsum(-1) - 1).clamp(min=0).tolist()
            self.valid_prompt = mask.sum(-1).tolist()
        else:
            self.mask = torch.ones((batch_size, self.width), dtype=torch.long, device=self.device)
            self.prompt_positions = [list(range(self.width))] * batch_size
            self.valid_prompt = [self.width] * batch_size

    def rewind(self, row: int, length: int) -> None:
        """Keep the slots of the row's first ``length`` tokens. The next token is chosen from stored logits; when
        the buffer lacks them (a deep rewind), or a forward runs anyway, the loop feeds the last kept token again
        (``BackstepLoop._forward``, with :meth:`drop_last`)."""
        self.target[row] = min(self.target[row], self.prefix + length - self.dropped[row])

    # -- queries -------------------------------------------------------------------------------------------
    def fed(self, row: int) -> int:
        """Tokens of ``row`` whose slots are in the cache (after pending cuts)."""
        return self.target[row] - self.pads[row] - self.prefix + self.dropped[row]

    def position(self, row: int, token_index: int) -> int:
        slot = token_index + self.prefix - self.dropped[row]
        if slot < len(self.prompt_positions[row]):
            return int(self.prompt_positions[row][slot])
        return int(self.valid_prompt[row]) + slot - len(self.prompt_positions[row])

    # -- changes -------------------------------------------------------------------------------------------
    def drop_last(self, row: int) -> None:
        """Forget the row's newest kept slot (its token is fed again)."""
        self.target[row] -= 1

    def drop_padding(self, row: int) -> None:
        """Forget the masked padding slot the row just took while it waited for its buffer. Unlike a finished
        row's, this slot is not trailing: the row writes again next step, so the slot goes at the next
        realignment and the row's slots stay one per kept token."""
        self.pads[row] -= 1
        self.target[row] -= 1

    def realign(self, tight: bool = False) -> None:
        """Apply pending cuts: move the rows whose padding changes.

        Two layouts are possible after a cut: keep the width (only the cut rows move, right by what they lost)
        or shrink it to the longest row (every row whose padding changes moves: at batch size 1 none does, the
        cache is just cropped). The one that moves fewer rows is taken, the narrower on a tie. ``tight`` (when
        the next column would not fit, and at the end) always shrinks, and drops finished rows' padding slots.
        """
        if tight:
            for b in range(self.batch):
                if self.pads[b]:
                    self.target[b] = min(self.target[b], self.content[b] - self.pads[b])
                    self.pads[b] = 0
        if self.target == self.content and (not tight or self.width == max(self.target)):
            return
        old_offsets = [self.width - c for c in self.content]

        def plan(width: int) -> tuple[list[int], list[int]]:
            offsets = [width - t for t in self.target]
            return offsets, [b for b in range(self.batch) if old_offsets[b] != offsets[b]]

        new_width = max(self.target)
        new_offsets, moving = plan(new_width)
        if not tight and new_width < self.width:
            kept_offsets, kept_moving = plan(self.width)
            if len(kept_moving) < len(moving):
                new_width, new_offsets, moving = self.width, kept_offsets, kept_moving
        rows = torch.tensor(moving, dtype=torch.long, device=self.device)
        index = torch.empty((len(moving), new_width), dtype=torch.long, device=self.device)
        if moving:
            shift = torch.tensor([new_offsets[b] - old_offsets[b] for b in moving], device=self.device)
            index = (torch.arange(new_width, device=self.device)[None, :] - shift[:, None]).clamp(0, self.width - 1)
            self.realignments += 1
        _compat.move_slots(self.cache, rows, index, self.width, new_width)
        assert self.mask is not None
        mask = self.mask[:, :new_width].clone()
        if moving:
            mask[rows] = self.mask[rows].gather(1, index)
        columns = torch.arange(new_width, device=self.device)[None, :]
        offsets = torch.tensor(new_offsets, device=self.device)[:, None]
        self.mask = mask.masked_fill(columns < offsets, 0)
        self.padded = bool(any(new_offsets)) or self.prompt_mask is not None or any(self.pads)
        self.width = new_width
        self.content = list(self.target)

    def append_column(self, real: list[bool]) -> torch.Tensor | None:
        """Append one column: ``real[b]`` rows attend to their new slot, the others get a masked padding slot.
        Returns the attention mask to pass to the model (``None`` when nothing is masked)."""
        if self.width + 1 > self.capacity:
            self.realign(tight=True)
            if self.width + 1 > self.capacity:
                raise RuntimeError(f"backstep cache layout overflow: {self.width + 1} slots > {self.capacity}")
        assert self.mask is not None
        column = torch.tensor(real, dtype=torch.long, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, column], dim=-1)
        for b in range(self.batch):
            self.content[b] += 1
            if not real[b]:
                self.pads[b] += 1
                self.padded = True
        self.target = list(self.content)
        self.width += 1
        self.peak_width = max(self.peak_width, self.width)
        return self.mask if self.padded else None
