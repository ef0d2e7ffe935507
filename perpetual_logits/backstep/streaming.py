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
        streamer: a transformers streamer (batch size 1), or ``None``.
    """

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer

    def put(self, tokens: torch.Tensor, row: int, begin: int, end: int) -> None:
        """Stream ``tokens[row, begin:end]`` (positions ``begin`` to ``end`` just became final)."""
        if self.streamer is not None and end > begin:
            self.streamer.put(tokens[row, begin:end].cpu())

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
