"""Streaming with hold-back: a row's tokens reach the streamer once the rewind policy made them final."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["HoldBack"]


class HoldBack:
    """Hands the streamer each row's newly final tokens (which tokens are final is the policy's call:
    :meth:`~perpetual_logits.backstep.policy.RewindPolicy.settle`), so a streamer only ever receives tokens
    that stay.

    Args:
        streamer: a transformers streamer (batch size 1), a row streamer (any batch size: it has
            ``put_row(row, tokens)`` and receives each row's final tokens separately), or ``None``.
    """

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer
        self.put_row = getattr(streamer, "put_row", None)

    def put(self, tokens: torch.Tensor, row: int, begin: int, end: int) -> None:
        """Stream ``tokens[row, begin:end]`` (positions ``begin`` to ``end`` just became final)."""
        if end <= begin:
            return
        if self.put_row is not None:
            self.put_row(row, tokens[row, begin:end].cpu())
        elif self.streamer is not None:
            self.streamer.put(tokens[row, begin:end].cpu())

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
