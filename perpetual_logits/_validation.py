"""Argument checks shared by every public constructor and function: one helper per kind of argument.

Every helper returns the normalised value or raises ``ValueError`` (a wrong value) / ``TypeError`` (a wrong
kind of object where no value of that kind could work, e.g. a tokenizer without ``decode``) whose message
names the argument and says what it accepts. Numbers are bounded where a huge value would only mean a hang
or an overflow later (see ``maximum``).

Example:

```python
>>> from perpetual_logits import _validation
>>> _validation.positive_int(3, "steps")
3
>>> _validation.positive_float("2", "peak")
Traceback (most recent call last):
...
ValueError: `peak` must be a finite number > 0, got '2' (str)

```
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "MAX_STEPS",
    "boolean",
    "check_scores",
    "choice",
    "eos_ids",
    "finite_float",
    "has_decode",
    "open_unit_interval",
    "phrases",
    "positive_float",
    "positive_int",
    "probability",
    "token_sequence",
]

#: The largest step count a schedule or a window accepts: far beyond any generation, small enough that a
#: table over it is never built and ``float`` arithmetic on it stays exact.
MAX_STEPS = 1 << 31


def _kind(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def boolean(value: object, name: str) -> bool:
    """A real ``bool`` (``0``/``1``/strings are refused: ``"False"`` would be true)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {_kind(value)}")
    return value


def positive_int(value: object, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An int in ``[minimum, maximum]`` (``bool`` refused)."""
    accepted = f"an int >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be {accepted}, got {_kind(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
    return int(value)


def finite_float(value: object, name: str) -> float:
    """Any finite number, as a float."""
    if not _is_number(value):
        raise ValueError(f"`{name}` must be a finite number, got {_kind(value)}")
    try:
        result = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        raise ValueError(f"`{name}` must be a finite number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return result


def positive_float(value: object, name: str, maximum: float | None = None) -> float:
    """A finite number > 0 (and <= ``maximum`` when given), as a float."""
    accepted = "a finite number > 0" + (f" and <= {maximum:g}" if maximum is not None else "")
    if not _is_number(value):
        raise ValueError(f"`{name}` must be {accepted}, got {_kind(value)}")
    try:
        result = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}") from None
    if not math.isfinite(result) or result <= 0 or (maximum is not None and result > maximum):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
    return result


def probability(value: object, name: str) -> float:
    """A float in (0, 1]."""
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be a float in (0, 1], got {_kind(value)}")
    if not 0.0 < float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be a float in (0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def open_unit_interval(value: object, name: str) -> float:
    """A float in (0, 1), both ends excluded (a decay rate, a tolerance)."""
    if not _is_number(value) or not 0.0 < float(value) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be a float in (0, 1), got {_kind(value)}")
    return float(value)  # type: ignore[arg-type]


def choice(value: object, name: str, options: Sequence[str]) -> str:
    """One of ``options`` (exact string match)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, options))}, got {_kind(value)}")
    return value


def eos_ids(value: object, name: str = "eos_token_id") -> tuple[int, ...]:
    """Normalise one token id or a collection of them into a sorted tuple of distinct non-negative ints."""
    accepted = f"`{name}` must be a non-negative int or a non-empty list of non-negative ints"
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(f"{accepted}, got a tensor of dtype {value.dtype} and shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, bool):
        raise ValueError(f"{accepted}, got {value!r}")
    if isinstance(value, int):
        items: list[object] = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)):
        items = list(value)
    else:
        raise ValueError(f"{accepted}, got {_kind(value)}")
    if not items:
        raise ValueError(f"{accepted}, got an empty collection")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{accepted}, got {value!r}")
    return tuple(sorted({int(i) for i in items}))  # type: ignore[call-overload]


def token_sequence(value: object, name: str = "tokens") -> Sequence[Hashable]:
    """A one-dimensional sequence of hashable items (a list, a tuple, a str; a 1-D tensor becomes a list)."""
    if isinstance(value, str):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"`{name}` must be one-dimensional, got a tensor of shape {tuple(value.shape)}")
        return value.tolist()
    if not isinstance(value, Sequence):  # a str is a sequence of characters, a fine token sequence
        raise ValueError(f"`{name}` must be a sequence (list, tuple, 1-D tensor), got {type(value).__name__}")
    for item in value:
        if isinstance(item, (list, tuple, torch.Tensor)):
            raise ValueError(f"`{name}` must be one-dimensional, got a nested (2-D or more) sequence")
        if not isinstance(item, Hashable):
            raise ValueError(f"`{name}` items must be hashable (token ids or strings), got {type(item).__name__}")
    return value


#: Texts on which a phrase regex must not find an empty match: empty, a space, a word, words, punctuation.
_EMPTY_PROBES = ("", " ", "a", "The end. \n", "Ab, c!")


def phrases(value: object, name: str) -> tuple[Any, ...]:
    """A non-empty collection of phrases: strings with a non-space character, or compiled regexes that
    cannot match the empty string (a phrase that matches nothing visible would fire at every step).

    A single string or pattern counts as a collection of one.

    Example:

    ```python
    >>> import re
    >>> from perpetual_logits._validation import phrases
    >>> phrases(["The End", re.compile(r"\\bend\\b")], "ban_phrases")
    ('The End', re.compile('\\\\bend\\\\b'))
    >>> phrases([re.compile("a*")], "ban_phrases")
    Traceback (most recent call last):
    ...
    ValueError: `ban_phrases` must not hold a regex that matches the empty string, got re.compile('a*')

    ```
    """
    import regex  # the third-party module: PhraseMatcher accepts its patterns too

    patterns = (re.Pattern, regex.Pattern)
    accepted = f"`{name}` must be a non-empty list of strings or compiled regexes"
    if isinstance(value, (str, *patterns)):
        items: list[object] = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = list(value)
    else:
        raise ValueError(f"{accepted}, got {_kind(value)}")
    if not items:
        raise ValueError(f"{accepted}, got an empty collection")
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                raise ValueError(f"`{name}` must not hold an empty or whitespace-only phrase, got {item!r}")
        elif isinstance(item, patterns):
            if not isinstance(item.pattern, str):
                raise ValueError(f"`{name}` regexes must be str patterns, not bytes, got {item!r}")
            if any(m.group() == "" for probe in _EMPTY_PROBES for m in item.finditer(probe)):
                raise ValueError(f"`{name}` must not hold a regex that matches the empty string, got {item!r}")
        else:
            raise ValueError(f"{accepted}, got an item {_kind(item)}")
    return tuple(items)


def has_decode(value: Any, name: str = "tokenizer") -> Any:
    """An object with a callable ``decode`` (a transformers tokenizer)."""
    if not callable(getattr(value, "decode", None)):
        raise TypeError(f"`{name}` must be a tokenizer (an object with decode()), got {type(value).__name__}")
    return value


def check_scores(input_ids: torch.Tensor, scores: torch.Tensor, eos: tuple[int, ...]) -> None:
    """Shapes a processor accepts: scores (batch, vocab) and input_ids (batch, length)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"`scores` must be a tensor of shape (batch, vocab), got {_shape(scores)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
        raise ValueError(
            f"`input_ids` must have shape (batch, length) with the batch of `scores` ({scores.shape[0]}), "
            f"got {_shape(input_ids)}"
        )
    if not scores.dtype.is_floating_point:
        raise ValueError(f"`scores` must be a floating-point tensor, got {scores.dtype}")
    if max(eos) >= scores.shape[-1]:
        raise ValueError(f"`eos_token_id` {max(eos)} is outside the vocabulary of size {scores.shape[-1]}")


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
