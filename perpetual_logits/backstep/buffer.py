"""The raw-logits ring buffer: a rewind to a recent position needs no forward pass."""

from __future__ import annotations

import torch

from ..protocol import RowState

__all__ = ["LogitsRing"]


class LogitsRing(RowState):
    """Keeps, per row, the raw logits of its last ``capacity`` positions (the distribution each position's
    token was drawn from). After a rewind to position ``p`` the row draws again from the stored logits for
    ``p``; only when ``p`` is older than the buffer must the token before ``p`` be fed again (a *deep* rewind).

    Args:
        capacity: positions kept per row.
        vocab_size: logits per position.
    """

    def __init__(self, capacity: int, vocab_size: int, device: torch.device) -> None:
        self.capacity = capacity
        self.vocab_size = vocab_size
        self.device = device
        self.logits = torch.empty(0)
        self.positions: list[list[int]] = []

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.logits = torch.empty((self.capacity, batch_size, self.vocab_size), dtype=torch.float32, device=self.device)
        self.positions = [[-1] * self.capacity for _ in range(batch_size)]

    def rewind(self, row: int, length: int) -> None:
        # Positions after `length` were predicted from removed tokens; `length` itself stays valid.
        self.positions[row] = [p if p <= length else -1 for p in self.positions[row]]

    def store(self, raw: torch.Tensor, rows: list[int], positions: list[int]) -> None:
        """``raw[b]`` predicts position ``positions[b]`` for each ``b`` in ``rows``."""
        if not rows:
            return
        slots = [positions[b] % self.capacity for b in rows]
        for b, slot in zip(rows, slots):
            self.positions[b][slot] = positions[b]
        # One copy for all rows (a copy per row costs a kernel launch each on an accelerator).
        index = torch.tensor(rows, device=self.device)
        self.logits[torch.tensor(slots, device=self.device), index] = raw[index]

    def has(self, row: int, position: int) -> bool:
        return self.positions[row][position % self.capacity] == position

    def get(self, row: int, position: int) -> torch.Tensor:
        return self.logits[position % self.capacity, row]
