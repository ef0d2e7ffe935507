"""The length mode and the landing: a row writes at least a minimum, then ends at a natural boundary.

* :class:`Landing` -- the settings: from ``margin`` tokens before ``max_new_tokens`` (and, in the length mode,
  from the minimum on) EOS is raised right after a sentence or line end, more and more; a row that still
  reaches the limit is cut back to its last complete sentence (:func:`~perpetual_logits.boundaries.cut_point`).
* :class:`RowText` -- per row, what the text says: whether it ends at a sentence end now, where its last
  boundary is, whether its minimum (tokens, words) is reached. A :class:`~perpetual_logits.RowState`.
* :class:`LandingBias` -- the logits processor that raises EOS at sentence ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

from .. import _validation
from ..boundaries import count_words, ends_sentence
from ..protocol import RowState

__all__ = ["Landing", "LandingBias", "RowText"]


@dataclass(frozen=True)
class Landing:
    """How a row ends before ``max_new_tokens`` instead of being cut wherever the budget runs out.

    Args:
        margin (`int`, defaults to 64): tokens before the limit from which EOS is favoured right after a sentence
            or line end; the favour rises linearly over these tokens. In the length mode the rise also starts
            where the row reaches its minimum (whichever comes first).
        strength (`float`, defaults to 8.0): logit added to EOS at a sentence end once the rise is complete
            (``strength * steps / margin`` before).
        cut_back (`bool`, defaults to `True`): a row that reaches the limit anyway is returned cut back to its
            last complete sentence or line (failing that, its last whole word), never below what was already
            streamed. Streaming holds the text after the last sentence end (up to ``2 * margin`` tokens), so
            nothing streamed is ever cut.

    Example:

    ```python
    >>> from perpetual_logits import Landing
    >>> Landing().margin, Landing(margin=16, strength=4.0).strength
    (64, 4.0)
    >>> Landing(margin=0)
    Traceback (most recent call last):
    ...
    ValueError: `margin` must be an int >= 1, got 0

    ```
    """

    margin: int = 64
    strength: float = 8.0
    cut_back: bool = True

    def __post_init__(self) -> None:
        _validation.positive_int(self.margin, "margin")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not self.strength >= 0:
            raise ValueError(f"`strength` must be a number >= 0, got {self.strength!r}")
        if not isinstance(self.cut_back, bool):
            raise ValueError(f"`cut_back` must be a bool, got {self.cut_back!r}")


class RowText(RowState):
    """What each row's decoded text says, kept up to date token by token (a few tokens decoded per step).

    Args:
        tokenizer: decodes token ids.
        ids: returns a row's tokens (prompt included).
        min_tokens: generated tokens a row must have before its own end is accepted (0: none).
        min_words: words (see :func:`~perpetual_logits.boundaries.count_words`) it must have (0: none).
        landing: the landing settings, or ``None``.
        max_length: the most tokens a row may hold (prompt included).
    """

    def __init__(
        self,
        tokenizer: Any,
        ids: Callable[[int], Sequence[int]],
        min_tokens: int,
        min_words: int,
        landing: Landing | None,
        max_length: int,
    ) -> None:
        # -- settings
        self.tokenizer = tokenizer
        self.ids = ids
        self.min_tokens = min_tokens
        self.min_words = min_words
        self.landing = landing
        self.max_length = max_length
        self.prompt_length = 0
        # -- per row: the end of the text, its sentence/line ends (lengths, ascending), the minimum
        self.tail: list[str] = []
        self.pending: list[bool] = []  # the text ends with sentence punctuation not yet confirmed by a space
        self.boundaries: list[list[int]] = []
        self.reached_at: list[int | None] = []

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.tail = [""] * batch_size
        self.pending = [False] * batch_size
        self.boundaries = [[] for _ in range(batch_size)]
        self.reached_at = [None] * batch_size

    def rewind(self, row: int, length: int) -> None:
        kept = self.boundaries[row]
        while kept and kept[-1] > length:
            kept.pop()
        reached = self.reached_at[row]
        if reached is not None and reached > length:
            self.reached_at[row] = None
        ids = self.ids(row)
        self.tail[row] = self._decode(ids[max(self.prompt_length, length - 4) : length])[-16:]
        tail = self.tail[row]
        self.pending[row] = ends_sentence(tail) and tail == tail.rstrip(" \t\n")

    # -- updates -------------------------------------------------------------------------------------------
    def observe(self, row: int) -> None:
        """Read the row's newest token."""
        ids = self.ids(row)
        length = len(ids)
        before = self._decode(ids[max(self.prompt_length, length - 5) : length - 1])
        after = self._decode(ids[max(self.prompt_length, length - 5) : length])
        piece = after[len(before) :] if after.startswith(before) else after[-1:]
        if piece:
            if self.pending[row] and piece[0].isspace():
                self._mark(row, length - 1)
            tail = (self.tail[row] + piece)[-16:]
            self.tail[row] = tail
            stripped = tail.rstrip(" \t")
            if stripped.endswith("\n") or (stripped != tail and ends_sentence(stripped)):
                self._mark(row, length)
                self.pending[row] = False
            else:
                self.pending[row] = ends_sentence(tail)
        if self.reached_at[row] is None and self._minimum_met(row, ids):
            self.reached_at[row] = length

    def _mark(self, row: int, length: int) -> None:
        kept = self.boundaries[row]
        if not kept or kept[-1] < length:
            kept.append(length)

    def _minimum_met(self, row: int, ids: Sequence[int]) -> bool:
        generated = len(ids) - self.prompt_length
        if generated < self.min_tokens or (self.min_tokens == 0 and self.min_words == 0):
            return False
        if self.min_words == 0:
            return True
        if 2 * generated < self.min_words:  # a word takes at least half a token: no need to decode yet
            return False
        return count_words(self._decode(ids[self.prompt_length :])) >= self.min_words

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # -- queries -------------------------------------------------------------------------------------------
    def minimum_reached(self, row: int) -> bool:
        """The row has its minimum (the length mode is on and the row wrote enough)."""
        return self.reached_at[row] is not None

    def at_sentence_end(self, row: int) -> bool:
        """The text (special tokens skipped) ends with a sentence or line end now."""
        return ends_sentence(self.tail[row])

    def due(self, row: int) -> int | None:
        """The length from which EOS is favoured at sentence ends (``None``: no landing)."""
        if self.landing is None:
            return None
        due = self.max_length - self.landing.margin
        reached = self.reached_at[row]
        return due if reached is None else min(due, reached)

    def accepts_end(self, row: int, length: int) -> bool:
        """Whether an EOS sampled by ``row`` (its text ``length - 1`` tokens long) ends the row: the minimum is
        reached, or the row is landing and its text ends a sentence."""
        if self.minimum_reached(row):
            return True
        due = self.due(row)
        return due is not None and length - 1 >= due and self.at_sentence_end(row)

    def held(self, row: int, length: int) -> int:
        """Trailing tokens a streamer must hold so that a cut back to the last sentence end stays possible."""
        if self.landing is None or not self.landing.cut_back:
            return 0
        kept = self.boundaries[row]
        last = kept[-1] if kept else self.prompt_length
        return min(length - last, 2 * self.landing.margin)


class LandingBias(LogitsProcessor):
    """Raises EOS for rows whose text ends a sentence, from their due point on, rising over ``margin`` tokens.

    Args:
        text: the rows' :class:`RowText`.
        lengths: returns each row's length (prompt included).
        eos: the EOS ids.
    """

    def __init__(self, text: RowText, lengths: Callable[[], list[int]], eos: Sequence[int]) -> None:
        assert text.landing is not None
        self.text = text
        self.lengths = lengths
        self.eos = list(eos)
        self.margin = text.landing.margin
        self.strength = float(text.landing.strength)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lens = self.lengths()
        boost: list[tuple[int, float]] = []
        for row, length in enumerate(lens):
            due = self.text.due(row)
            if due is None or length < due or not self.text.at_sentence_end(row):
                continue
            boost.append((row, self.strength * min(1.0, (length - due + 1) / self.margin)))
        if not boost or not self.eos:
            return scores
        out = scores.clone()
        for row, amount in boost:
            out[row, self.eos] += amount
        return out  # type: ignore[return-value]
