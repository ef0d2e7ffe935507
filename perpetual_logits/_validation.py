"""Argument checks shared by the public constructors. Every error names the argument and what it accepts."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def eos_ids(value: object, name: str = "eos_token_id") -> tuple[int, ...]:
    """Normalise one EOS id or a collection of them into a sorted tuple of distinct non-negative ints."""
    accepted = f"`{name}` must be a non-negative int or a non-empty list of non-negative ints"
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(f"{accepted}, got a tensor of dtype {value.dtype} and shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, bool):
        raise ValueError(f"{accepted}, got {value!r}")
    if isinstance(value, int):
        items: list[object] = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        raise ValueError(f"{accepted}, got {value!r} ({type(value).__name__})")
    if not items:
        raise ValueError(f"{accepted}, got an empty collection")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{accepted}, got {value!r}")
    return tuple(sorted({int(i) for i in items}))  # type: ignore[call-overload]


def positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def probability(value: object, name: str) -> float:
    """A float in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a float in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be a float in (0, 1], got {value!r}")
    return float(value)


def check_scores(input_ids: torch.Tensor, scores: torch.Tensor, eos: tuple[int, ...]) -> None:
    """Shapes a processor accepts: scores (batch, vocab) and input_ids (batch, length)."""
    if scores.dim() != 2:
        raise ValueError(f"`scores` must have shape (batch, vocab), got {tuple(scores.shape)}")
    if input_ids.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
        raise ValueError(
            f"`input_ids` must have shape (batch, length) with the batch of `scores` ({scores.shape[0]}), "
            f"got {tuple(input_ids.shape)}"
        )
    if not scores.dtype.is_floating_point:
        raise ValueError(f"`scores` must be a floating-point tensor, got {scores.dtype}")
    if max(eos) >= scores.shape[-1]:
        raise ValueError(f"`eos_token_id` {max(eos)} is outside the vocabulary of size {scores.shape[-1]}")


def phrase(value: object, name: str) -> Any:
    """One phrase to watch for: a string with visible characters, or a compiled regular expression that cannot
    match the empty string (it would match everywhere)."""
    import re

    import regex

    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"`{name}` must not contain empty or whitespace-only strings, got {value!r}")
        return value
    if isinstance(value, (re.Pattern, regex.Pattern)):
        if value.search("") is not None:
            raise ValueError(
                f"`{name}` must not contain a pattern that matches the empty string, got {value.pattern!r}"
            )
        return value
    raise ValueError(f"`{name}` must contain strings or compiled regular expressions, got {value!r}")
