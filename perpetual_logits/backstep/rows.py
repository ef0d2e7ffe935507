"""The rows of a backstep batch: their tokens, lengths and whether they are done."""

from __future__ import annotations

import torch

from ..protocol import RowState, RowView

__all__ = ["Rows"]


class Rows(RowState):
    """Each row's tokens (prompt included), as Python lists and as a left-aligned tensor.

    Args:
        input_ids: the prompt, (batch, prompt_length), left-padded like ``generate()`` pads it.
        prompt_mask: its attention mask, or ``None``.
        max_length: the most tokens a row may hold (prompt included): ``generate()``'s ``max_length``.
        pad: the id written after a row's end in the returned sequences.
    """

    def __init__(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor | None, max_length: int, pad: int) -> None:
        self.device = input_ids.device
        self.batch, self.prompt_length = input_ids.shape
        self.max_length = max_length
        self.pad = pad
        self.prompt = input_ids
        # Leading padding is not text: phrase and loop checks start after it.
        if prompt_mask is not None and prompt_mask.shape[-1] == self.prompt_length:
            self.text_start = [row.index(1) if 1 in row else self.prompt_length for row in prompt_mask.tolist()]
        else:
            self.text_start = [0] * self.batch
        self.ids: list[list[int]] = []
        self.lens: list[int] = []
        self.finished: list[bool] = []
        self.tokens = torch.empty(0)
        self.pending: list[tuple[int, int, int]] = []  # (row, position, token) not yet written to `tokens`

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int) -> None:
        self.ids = self.prompt.tolist()
        self.lens = [prompt_length] * batch_size
        self.finished = [self.max_length <= prompt_length] * batch_size
        self.tokens = torch.full((batch_size, self.max_length + 1), self.pad, dtype=torch.long, device=self.device)
        self.tokens[:, :prompt_length] = self.prompt

    def rewind(self, row: int, length: int) -> None:
        # The row's pending tokens past the cut are dropped rather than flushed (a tensor write per rewind): it
        # writes those positions again, and one flush must not write a position twice (the order of duplicate
        # indices in one write is unspecified). What `tokens` holds past a row's length is never read.
        if self.pending:
            self.pending = [entry for entry in self.pending if entry[0] != row or entry[1] < length]
        del self.ids[row][length:]
        self.lens[row] = length
        self.finished[row] = False

    def finish(self, row: int) -> None:
        self.finished[row] = True

    # -- changes and queries ------------------------------------------------------------------------------
    def append(self, row: int, token: int) -> None:
        self.pending.append((row, self.lens[row], token))
        self.ids[row].append(token)
        self.lens[row] += 1

    def flush(self) -> None:
        """Write the step's appended tokens into :attr:`tokens` in one copy (one per token would cost a kernel
        launch each on an accelerator)."""
        if self.pending:
            rows, cols, values = zip(*self.pending)
            index = torch.tensor([rows, cols], device=self.device)
            self.tokens[index[0], index[1]] = torch.tensor(values, device=self.device)
            self.pending = []

    def active(self) -> list[int]:
        return [b for b in range(self.batch) if not self.finished[b]]

    def full(self, row: int) -> bool:
        """The row holds ``max_length`` tokens (``max_new_tokens`` reached)."""
        return self.lens[row] >= self.max_length

    def view_of(self, row: int) -> RowView:
        return RowView(row, self.ids[row], self.prompt_length, self.text_start[row], final=self.full(row))

    def right_aligned(self) -> torch.Tensor:
        """All rows left-padded to the longest: what processors and stopping criteria see (``generate()``'s own
        layout). Length-dependent processors are given each row's own length separately
        (:func:`~perpetual_logits.processor_list.per_row_lengths`)."""
        self.flush()
        longest = max(self.lens)
        if min(self.lens) == longest:
            return self.tokens[:, :longest]
        lens = torch.tensor(self.lens, device=self.device)
        index = torch.arange(longest, device=self.device)[None, :] + (lens[:, None] - longest)
        view = self.tokens.gather(1, index.clamp(min=0))
        return view.masked_fill(index < 0, self.pad)

    def sequences(self) -> torch.Tensor:
        """The result: rows left-aligned, padded after their end (like ``generate()``)."""
        self.flush()
        longest = max(self.lens)
        out = self.tokens[:, :longest].clone()
        for b in range(self.batch):
            out[b, self.lens[b] :] = self.pad
        return out
