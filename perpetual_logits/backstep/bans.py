"""Tokens forbidden per row and position: what a rewind must not simply write again (owned by the rewind
policy; the HF loop applies them to its logits, the vLLM driver sends them to its processor)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..protocol import RowState

__all__ = ["Bans"]


class Bans(RowState):
    """Per row, ``{position: tokens}`` forbidden when that position is chosen, plus tokens forbidden at every
    position (EOS once a row's EOS budget is spent and ``on_exhausted="suppress"``).

    Bans are applied to the raw logits before the processors, so top-k/top-p choose among the rest. A row
    whose every finite logit would be banned keeps its logits (never NaN).
    """

    def __init__(self) -> None:
        self.at: list[dict[int, set[int]]] = []
        self.always: list[set[int]] = []

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.at = [{} for _ in range(batch_size)]
        self.always = [set() for _ in range(batch_size)]

    def rewind(self, row: int, length: int) -> None:
        # Bans belong to a path: once the row is cut back before a position, that position's bans lapse.
        self.at[row] = {pos: tokens for pos, tokens in self.at[row].items() if pos <= length}

    def add(self, row: int, position: int, tokens: Iterable[int]) -> None:
        self.at[row].setdefault(position, set()).update(tokens)

    def forbid_always(self, row: int, tokens: Iterable[int]) -> None:
        self.always[row].update(tokens)

    def apply(self, logits: torch.Tensor, rows: list[int], lens: list[int]) -> torch.Tensor:
        """``logits`` with each listed row's bans for its next position at -inf (a new tensor if anything
        changed)."""
        pairs: list[tuple[int, int]] = []
        for b in rows:
            banned = self.at[b].get(lens[b], set()) | self.always[b]
            pairs.extend((b, t) for t in banned)
        if not pairs:
            return logits
        index = torch.tensor(pairs, device=logits.device).T
        masked = logits.index_put((index[0], index[1]), torch.tensor(float("-inf"), device=logits.device))
        has_other = torch.isfinite(masked).any(-1, keepdim=True)
        return torch.where(has_other, masked, logits)
