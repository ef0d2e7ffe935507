"""Hold-back: tokens become final (streamed, never removed) once they are far enough behind a row's end."""

from __future__ import annotations

from typing import Any

import torch

from ..protocol import RowState

__all__ = ["HoldBack"]


class HoldBack(RowState):
    """Per row, how many tokens are final. A rewind never reaches below that point, so a streamer only ever
    receives tokens that stay.

    Args:
        streamer: a transformers streamer (batch size 1), a row streamer (any batch size: it has
            ``put_row(row, tokens)`` and receives each row's final tokens separately), or ``None``.
        hold_back: the newest tokens of a row that stay revisable.
    """

    def __init__(self, streamer: Any, hold_back: int) -> None:
        self.streamer = streamer
        self.hold_back = hold_back
        self.put_row = getattr(streamer, "put_row", None)
        self.final: list[int] = []

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.final = [prompt_length] * batch_size

    def rewind(self, row: int, length: int) -> None:
        """Rewinds are clamped to :attr:`final` before they happen; nothing to undo here."""

    def advance(self, tokens: torch.Tensor, lens: list[int], finished: list[bool], held: list[int]) -> None:
        """Make final what is at least ``max(hold_back, held[row])`` behind each row's end (everything, for a
        finished row), and stream it."""
        for b, length in enumerate(lens):
            target = length if finished[b] else max(self.final[b], length - max(self.hold_back, held[b]))
            if target > self.final[b]:
                if self.put_row is not None:
                    self.put_row(b, tokens[b, self.final[b] : target].cpu())
                elif self.streamer is not None:
                    self.streamer.put(tokens[b, self.final[b] : target].cpu())
                self.final[b] = target

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
