"""HoldBack: the streamer receives a row's tokens once they are final, by row when it can take rows."""

from __future__ import annotations

import torch

from perpetual_logits.backstep.streaming import HoldBack


class Plain:
    """A transformers-style streamer: ``put`` and ``end``."""

    def __init__(self) -> None:
        self.received: list[list[int]] = []
        self.ended = 0

    def put(self, tokens: torch.Tensor) -> None:
        self.received.append(tokens.tolist())

    def end(self) -> None:
        self.ended += 1


class ByRow(Plain):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, list[int]]] = []

    def put_row(self, row: int, tokens: torch.Tensor) -> None:
        self.rows.append((row, tokens.tolist()))


TOKENS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def test_a_plain_streamer_receives_the_final_span():
    streamer = Plain()
    hold = HoldBack(streamer)
    hold.put(TOKENS, row=0, begin=1, end=3)
    hold.put(TOKENS, row=0, begin=3, end=3)  # nothing became final: nothing sent
    hold.end()
    assert streamer.received == [[2, 3]] and streamer.ended == 1


def test_a_row_streamer_receives_each_row_separately():
    streamer = ByRow()
    hold = HoldBack(streamer)
    hold.put(TOKENS, row=1, begin=0, end=2)
    hold.put(TOKENS, row=0, begin=2, end=4)
    assert streamer.rows == [(1, [5, 6]), (0, [3, 4])]
    assert streamer.received == []  # never both ways


def test_no_streamer_is_fine():
    hold = HoldBack(None)
    hold.put(TOKENS, row=0, begin=0, end=4)
    hold.end()
