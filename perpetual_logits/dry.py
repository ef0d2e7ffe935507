"""A DRY ("Don't Repeat Yourself") penalty as a transformers ``LogitsProcessor``.

DRY is the repetition penalty of KoboldCpp, text-generation-webui and llama.cpp. Unlike
``repetition_penalty`` (every token seen before is penalised, so ordinary words like "the" are too) and
``no_repeat_ngram_size`` (an n-gram seen before is forbidden outright, however natural), DRY only penalises
a token that would *extend a repeat*: if the text ends with tokens ``s`` of length ``m`` that occurred
earlier followed by token ``t``, writing ``t`` now would continue a copy of length ``m + 1``, and ``t`` loses

    multiplier * base ** (m - allowed_length)        (for m >= allowed_length)

from its logit. The penalty grows exponentially with the length of the copy, so short common phrases cost
almost nothing and a verbatim loop soon becomes impossible. Sequence breakers (newline, ``:``, quotes, ``*``
by default) end a repeat: the text after the last breaker is the longest suffix that counts, so the
recurring "\\n**Name**: " scaffolding of a list or a dialogue is not penalised.

transformers 5.24 has no such processor (its ``RepetitionPenaltyLogitsProcessor`` and
``NoRepeatNGramLogitsProcessor`` are the two alternatives above), hence this one. It is written from the
published description of the sampler; details that differ from llama.cpp are noted in
:class:`DRYLogitsProcessor`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from . import _validation

__all__ = ["DEFAULT_SEQUENCE_BREAKERS", "DRYLogitsProcessor", "dry_penalties"]

DEFAULT_SEQUENCE_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")
"""KoboldCpp's and llama.cpp's default sequence breakers, as text."""

# base ** 64 is already astronomically large; capping the exponent keeps the arithmetic finite.
_MAX_EXPONENT = 64


def _z_function(seq: Sequence[int]) -> list[int]:
    """``z[i]`` = length of the longest common prefix of ``seq`` and ``seq[i:]`` (``z[0] = len(seq)``)."""
    n = len(seq)
    z = [0] * n
    if n == 0:
        return z
    z[0] = n
    left = right = 0
    for i in range(1, n):
        k = min(right - i, z[i - left]) if i < right else 0
        while i + k < n and seq[k] == seq[i + k]:
            k += 1
        z[i] = k
        if i + k > right:
            left, right = i, i + k
    return z


def dry_penalties(
    ids: Sequence[int], allowed_length: int, breakers: Collection[int] = frozenset(), max_length: int | None = None
) -> dict[int, int]:
    """For each token that would extend a repeat, the length of the longest repeat it would extend.

    The text ends with a suffix ``s``; wherever ``s[-m:]`` occurred earlier followed by token ``t``, writing
    ``t`` next would continue a copy of length ``m``. Only the tokens after the last sequence breaker can be
    part of ``s``, breaker tokens themselves are never penalised (a breaker ends a repeat, which is the way
    out we want), and only repeats of at least ``allowed_length`` tokens are returned.

    Computed with the Z-function of the reversed sequence: ``O(len(ids))``.

    Args:
        ids (`Sequence[int]`): the row's tokens (the window DRY looks at).
        allowed_length (`int`): shortest repeat that is penalised, >= 1.
        breakers (`Collection[int]`, *optional*): sequence-breaker token ids.
        max_length (`int`, *optional*): cap on the repeat length reported.

    Returns:
        `dict[int, int]`: token id -> repeat length (>= ``allowed_length``).

    Example:

    >>> dry_penalties([5, 6, 7, 8, 5, 6, 7], allowed_length=2)   # "5 6 7" again: 8 would repeat 3 tokens
    {8: 3}
    >>> dry_penalties([5, 6, 7, 8, 5, 6, 7], allowed_length=2, breakers={6})   # only "7" after the breaker
    {}
    """
    n = len(ids)
    limit = n
    for k in range(n - 1, -1, -1):
        if ids[k] in breakers:
            limit = n - 1 - k
            break
    if max_length is not None:
        limit = min(limit, max_length)
    if limit < allowed_length:
        return {}
    reversed_ids = list(ids[::-1])
    z = _z_function(reversed_ids)
    found: dict[int, int] = {}
    # Position i of the reversed row is the end of an earlier occurrence (ids[n - 1 - i]); the token that
    # followed it there is reversed_ids[i - 1].
    for i in range(1, n):
        m = min(z[i], limit)
        if m >= allowed_length:
            token = reversed_ids[i - 1]
            if token not in breakers and m > found.get(token, 0):
                found[token] = m
    return found


class DRYLogitsProcessor(LogitsProcessor):
    r"""DRY: penalise tokens that would extend a verbatim repeat, exponentially in the repeat's length.

    With ``m`` the length of the longest earlier occurrence of the text's suffix that was followed by token
    ``t`` (see :func:`dry_penalties`), ``t``'s score drops by ``multiplier * base ** (m - allowed_length)``
    when ``m >= allowed_length``. Sits with the other ``logits_processor``\ s, before temperature and top-p.

    Differences from llama.cpp's sampler, all deliberate: sequence breakers are token ids (a token counts as
    a breaker when its text contains a breaker string, see :meth:`from_tokenizer`; llama.cpp also matches
    breakers spanning several tokens), and a breaker token is never penalised itself.

    Args:
        multiplier (`float`, defaults to 0.8): strength; > 0 (llama.cpp's 0 means "off": just leave the
            processor out).
        base (`float`, defaults to 1.75): growth per extra repeated token; > 1.
        allowed_length (`int`, defaults to 2): repeats up to this length are free ("of the", "\n\n"); >= 1.
        sequence_breakers (`Collection[int]`, *optional*): token ids that end a repeat.
        penalty_last_n (`int`, *optional*): look at the last ``n`` tokens only (prompt included); ``None``
            (default): the whole sequence, as llama.cpp's default ``-1``.

    Example:

    ```python
    >>> import torch
    >>> dry = DRYLogitsProcessor(multiplier=1.0, base=2.0, allowed_length=2)
    >>> ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7]])   # 8 would make "5 6 7 8" a copy of length 4
    >>> dry(ids, torch.zeros(1, 10))[0, 8].item()      # 3 repeated tokens: 1.0 * 2 ** (3 - 2)
    -2.0
    >>> dry(ids, torch.zeros(1, 10))[0, 9].item()
    0.0

    ```
    """

    def __init__(
        self,
        multiplier: float = 0.8,
        base: float = 1.75,
        allowed_length: int = 2,
        sequence_breakers: Collection[int] = (),
        penalty_last_n: int | None = None,
    ) -> None:
        self.multiplier = _positive_float(multiplier, "multiplier")
        self.base = _positive_float(base, "base")
        if self.base <= 1.0:
            raise ValueError(f"`base` must be a float > 1, got {base!r}")
        self.allowed_length = _validation.positive_int(allowed_length, "allowed_length")
        if isinstance(sequence_breakers, (str, bytes)) or not isinstance(sequence_breakers, Collection):
            raise ValueError(f"`sequence_breakers` must be a collection of token ids, got {sequence_breakers!r}")
        for token in sequence_breakers:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"`sequence_breakers` must contain non-negative ints, got {token!r}")
        self.sequence_breakers = frozenset(sequence_breakers)
        if penalty_last_n is not None:
            penalty_last_n = _validation.positive_int(penalty_last_n, "penalty_last_n")
        self.penalty_last_n = penalty_last_n

    def __repr__(self) -> str:
        return (
            f"DRYLogitsProcessor(multiplier={self.multiplier}, base={self.base}, "
            f"allowed_length={self.allowed_length}, sequence_breakers=<{len(self.sequence_breakers)} ids>, "
            f"penalty_last_n={self.penalty_last_n})"
        )

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, breakers: Sequence[str] = DEFAULT_SEQUENCE_BREAKERS, **kwargs: Any
    ) -> DRYLogitsProcessor:
        """A processor whose sequence breakers are every token whose text contains one of ``breakers``.

        Args:
            tokenizer (`PreTrainedTokenizerBase`): anything with ``decode(list[int])`` and ``len()``.
            breakers (`Sequence[str]`, defaults to :data:`DEFAULT_SEQUENCE_BREAKERS`): breaker strings.
            kwargs: the other arguments of :class:`DRYLogitsProcessor`.
        """
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"`tokenizer` must have a decode() method, got {type(tokenizer).__name__}")
        if isinstance(breakers, str) or not all(isinstance(b, str) and b for b in breakers):
            raise ValueError(f"`breakers` must be a sequence of non-empty strings, got {breakers!r}")
        ids = [i for i in range(len(tokenizer)) if any(b in tokenizer.decode([i]) for b in breakers)]
        return cls(sequence_breakers=ids, **kwargs)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.dim() != 2 or scores.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(
                f"`input_ids` (batch, length) and `scores` (batch, vocab) must agree, got "
                f"{tuple(input_ids.shape)} and {tuple(scores.shape)}"
            )
        window = input_ids if self.penalty_last_n is None else input_ids[:, -self.penalty_last_n :]
        rows, tokens, amounts = [], [], []
        cap = self.allowed_length + _MAX_EXPONENT
        for row, ids in enumerate(window.tolist()):
            for token, length in dry_penalties(ids, self.allowed_length, self.sequence_breakers, cap).items():
                if token < scores.shape[1]:
                    rows.append(row)
                    tokens.append(token)
                    amounts.append(self.multiplier * self.base ** (length - self.allowed_length))
        if not rows:
            return scores
        out = scores.clone()
        index = (torch.tensor(rows, device=scores.device), torch.tensor(tokens, device=scores.device))
        out.index_put_(index, -torch.tensor(amounts, dtype=scores.dtype, device=scores.device), accumulate=True)
        return out  # type: ignore[return-value]


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"`{name}` must be a finite float > 0, got {value!r}")
    return float(value)
