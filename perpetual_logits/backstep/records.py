"""``output_scores`` / ``output_logits`` of a backstep run: one entry per returned token of each row."""

from __future__ import annotations

import torch

from ..protocol import RowState

__all__ = ["StepRecords"]


class StepRecords(RowState):
    """Keeps each step's scores/logits and, per row, which step chose each of its kept tokens; a rewind drops
    the row's steps for removed positions. :meth:`per_position` stacks them like ``generate()`` does."""

    def __init__(self, scores: bool, logits: bool) -> None:
        self.record_scores = scores
        self.record_logits = logits
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.row_steps: list[list[int]] = []
        self.prompt_length = 0

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.scores, self.logits = [], []
        self.row_steps = [[] for _ in range(batch_size)]
        self.prompt_length = prompt_length

    def rewind(self, row: int, length: int) -> None:
        del self.row_steps[row][length - self.prompt_length :]

    def add_step(self, scores: torch.Tensor, logits: torch.Tensor) -> None:
        if self.record_scores:
            self.scores.append(scores)
        if self.record_logits:
            self.logits.append(logits)

    def add_token(self, row: int, step: int) -> None:
        self.row_steps[row].append(step)

    def per_position(self, which: list[torch.Tensor], generated: int) -> tuple[torch.Tensor, ...] | None:
        """``generated`` tensors of shape (batch, vocab): row ``b``'s entry ``j`` is what chose its ``j``-th
        generated token (zeros after the row's end)."""
        if not which:
            return None if not generated else tuple()
        filler = torch.zeros_like(which[0][0])
        out = []
        for j in range(generated):
            rows = [which[steps[j]][b] if j < len(steps) else filler for b, steps in enumerate(self.row_steps)]
            out.append(torch.stack(rows))
        return tuple(out)
