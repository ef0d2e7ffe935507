"""Offline quality metrics for long generations: repetition, diversity, compression, end markers, bits/char.

All functions are pure and cheap (no model needed), so the CLI demo, the analysis tools and the benchmarks
share one definition of each number:

* :func:`rep_n` — ``1 - unique n-grams / all n-grams`` (Su et al. 2022); 0 = no repeated n-gram;
* :func:`distinct_n` — ``unique n-grams / all n-grams``, exactly ``1 - rep_n``;
* :func:`diversity` — ``Π (1 - rep_n)`` over several n (Su et al. 2022);
* :func:`compression_ratio` — ``len(bytes) / len(zlib(bytes))``; higher = more repetitive text;
* :func:`count_end_markers` — spelled end markers and ending phrases ("The End", "<|end_story|>", ...)
  that a model writes when it cannot emit EOS (the blog's Method 1 observation);
* :func:`bits_per_character` — a judge model's total negative log-likelihood turned into bits per character,
  comparable across tokenizers (unlike perplexity per token);
* :func:`per_thousand` — a count per 1,000 tokens;
* :func:`line_repeats` — the fraction of a text's lines that repeat an earlier line (a loop of lines).

TTR-style metrics favour short texts, so compare them at equal length (per block) where lengths differ.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Hashable, Sequence
from functools import lru_cache

import torch

from .. import _validation
from ..text.endings import ENDING_PHRASES, KNOWN_END_MARKERS

__all__ = [
    "END_MARKERS",
    "bits_per_character",
    "compression_ratio",
    "count_end_markers",
    "distinct_n",
    "diversity",
    "line_repeats",
    "ngrams",
    "per_thousand",
    "rep_n",
]

#: Spelled end markers and ending phrases: the texts of the special tokens that end generation in well-known
#: model families (:data:`~perpetual_logits.text.endings.KNOWN_END_MARKERS`, e.g. ``"<|end_story|>"``, which
#: TinyStories-656K writes out as ordinary subword pieces when EOS is unavailable) and the ending phrases that
#: ``ban_phrases="default"`` bans (:data:`~perpetual_logits.text.endings.ENDING_PHRASES`). One list, so that the
#: metric counts exactly what ending control removes. Decode with ``skip_special_tokens=True`` so that a real
#: EOS token is not counted as a spelled one.
END_MARKERS: tuple[str, ...] = KNOWN_END_MARKERS + ENDING_PHRASES


def _check_n(n: object) -> int:
    return _validation.positive_int(n, "n")


def _check_tokens(tokens: object) -> Sequence[Hashable]:
    # Tensors and arrays are accepted through their .tolist(); a bare iterator is refused because reading it
    # would consume the caller's data.
    tolist = getattr(tokens, "tolist", None)
    if callable(tolist) and not isinstance(tokens, (str, bytes, torch.Tensor)):
        tokens = tolist()
    return _validation.token_sequence(tokens, "tokens")


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """All ``len(tokens) - n + 1`` contiguous n-grams of ``tokens``, in order (empty if the text is shorter).

    Args:
        tokens (`Sequence`): token ids (or any hashable items; a ``str`` gives character n-grams).
        n (`int`): the n-gram order, ``>= 1``.

    Returns:
        `list[tuple]`: the n-grams.

    Example:

    >>> ngrams([1, 2, 3, 2], 2)
    [(1, 2), (2, 3), (3, 2)]
    >>> ngrams([1], 2)
    []
    """
    n = _check_n(n)
    items = list(_check_tokens(tokens))
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def rep_n(tokens: Sequence[Hashable], n: int) -> float:
    """Fraction of repeated n-grams: ``1 - unique n-grams / all n-grams``, in ``[0, 1)``.

    0.0 when the text has no n-grams at all (fewer than ``n`` tokens): nothing is repeated.

    Args:
        tokens (`Sequence[int]`): token ids of one text (a list, tuple or 1-D tensor).
        n (`int`): the n-gram order, ``>= 1``.

    Returns:
        `float`: the repetition rate.

    Raises:
        ValueError: ``n`` is not an int >= 1, or ``tokens`` is not a 1-D sequence.

    Example:

    >>> rep_n([5, 6, 5, 6, 5, 6], 2)   # n-grams 56 65 56 65 56: 2 unique of 5
    0.6
    >>> rep_n([1, 2, 3, 4], 2)
    0.0
    >>> rep_n([7], 2)
    0.0
    """
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(tokens: Sequence[Hashable], n: int) -> float:
    """Fraction of distinct n-grams: ``unique n-grams / all n-grams``; always ``1 - rep_n(tokens, n)``.

    1.0 when the text has no n-grams (so the identity with :func:`rep_n` holds everywhere). This is the
    per-text value; for a corpus-level one, pool the n-grams of several texts with :func:`ngrams`.

    Args:
        tokens (`Sequence[int]`): token ids of one text.
        n (`int`): the n-gram order, ``>= 1``.

    Returns:
        `float`: in ``(0, 1]``.

    Example:

    >>> distinct_n([5, 6, 5, 6, 5, 6], 2)
    0.4
    >>> distinct_n([], 3)
    1.0
    """
    grams = ngrams(tokens, n)
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def diversity(tokens: Sequence[Hashable], ns: Sequence[int] = (2, 3, 4)) -> float:
    """Su et al.'s diversity: ``Π over n in ns of (1 - rep_n(tokens, n))``, in ``(0, 1]``.

    Args:
        tokens (`Sequence[int]`): token ids of one text.
        ns (`Sequence[int]`, defaults to ``(2, 3, 4)``): the n-gram orders; must not be empty.

    Example:

    >>> diversity([1, 2, 3, 4, 5])
    1.0
    >>> round(diversity([1, 2] * 4, ns=(2,)), 3)   # 2 unique of 7 bigrams
    0.286
    """
    if isinstance(ns, (str, bytes)) or not isinstance(ns, Sequence) or len(ns) == 0:
        raise ValueError(f"`ns` must be a non-empty sequence of ints >= 1, got {ns!r}")
    out = 1.0
    for n in ns:
        out *= 1.0 - rep_n(tokens, _validation.positive_int(n, "ns"))
    return out


def compression_ratio(text: str | bytes) -> float:
    """``len(raw bytes) / len(zlib-compressed bytes)`` (level 9); higher = more repetitive.

    Text is encoded as UTF-8. zlib's fixed overhead (about 8 bytes) makes short texts score low, so compare
    texts of similar length. An empty text gives 0.0.

    Args:
        text (`str` or `bytes`): the text.

    Returns:
        `float`: the ratio, ``>= 0``.

    Example:

    >>> compression_ratio("ab" * 500) > 20
    True
    >>> compression_ratio("")
    0.0
    """
    if isinstance(text, str):
        raw = text.encode("utf-8")
    elif isinstance(text, bytes):
        raw = text
    else:
        raise ValueError(f"`text` must be a str or bytes, got {type(text).__name__}")
    if not raw:
        return 0.0
    return len(raw) / len(zlib.compress(raw, 9))


@lru_cache(maxsize=32)
def _marker_pattern(markers: tuple[str, ...], ignore_case: bool) -> re.Pattern[str]:
    # Longest first, so that when one marker is a prefix of another ("The end" / "The end.") the longer one
    # wins and the text is counted once.
    ordered = sorted(set(markers), key=len, reverse=True)
    return re.compile("|".join(re.escape(m) for m in ordered), re.IGNORECASE if ignore_case else 0)


def count_end_markers(text: str, markers: Sequence[str] = END_MARKERS, ignore_case: bool = False) -> int:
    """Number of non-overlapping occurrences of any of ``markers`` in ``text``.

    The text is scanned once, left to right, for all markers together; at each position the longest matching
    marker wins, and matched text is not reused. So ``"The end."`` counts once although both ``"The End"``
    (with ``ignore_case=True``) and ``"The end."`` would match there.

    Case: matching is case-sensitive by default, because :data:`END_MARKERS` lists the case variants that
    occur ("The End", "THE END", "the end."); ``ignore_case=True`` folds case for all markers.

    Args:
        text (`str`): decoded text (use ``skip_special_tokens=True`` so a real EOS is not counted).
        markers (`Sequence[str]`, defaults to :data:`END_MARKERS`): non-empty strings.
        ignore_case (`bool`, defaults to `False`): match regardless of case.

    Returns:
        `int`: the count.

    Example:

    >>> count_end_markers("They lived happily ever after. The end. <|end_story|>")
    2
    >>> count_end_markers("the end. THE END", markers=["The End"], ignore_case=True)
    2
    >>> count_end_markers("abcabc", markers=["abca", "bc"])   # "abca" first, then the last "bc"
    2
    """
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a str, got {type(text).__name__}")
    if isinstance(markers, str) or not isinstance(markers, Sequence) or len(markers) == 0:
        raise ValueError(f"`markers` must be a non-empty sequence of non-empty strings, got {markers!r}")
    if any(not isinstance(m, str) or not m for m in markers):
        raise ValueError(f"`markers` must be a non-empty sequence of non-empty strings, got {markers!r}")
    _validation.boolean(ignore_case, "ignore_case")
    return sum(1 for _ in _marker_pattern(tuple(markers), ignore_case).finditer(text))


def bits_per_character(total_nll_nats: float, n_chars: int) -> float:
    """A total negative log-likelihood in nats, spread over ``n_chars`` characters, in bits per character.

    ``bits/char = total_nll_nats / (n_chars * ln 2)``. Unlike perplexity per token it does not depend on the
    judge's tokenizer, so texts of any length and models with different vocabularies compare directly.

    Args:
        total_nll_nats (`float`): ``-Σ log p(token)`` over the scored tokens, natural log, ``>= 0``.
        n_chars (`int`): characters of the scored text, ``>= 1``.

    Returns:
        `float`: bits per character.

    Example:

    >>> bits_per_character(math.log(2) * 30, 10)
    3.0
    """
    nll = _validation.finite_float(total_nll_nats, "total_nll_nats")
    if nll < 0:
        raise ValueError(f"`total_nll_nats` must be a finite float >= 0, got {total_nll_nats!r}")
    return nll / (_validation.positive_int(n_chars, "n_chars") * math.log(2))


def per_thousand(count: float, n_tokens: int) -> float:
    """``count`` per 1,000 tokens; 0.0 when ``n_tokens`` is 0 (nothing was generated, nothing counted).

    Example:

    >>> per_thousand(3, 1500)
    2.0
    """
    if _validation.finite_float(count, "count") < 0:
        raise ValueError(f"`count` must be a finite number >= 0, got {count!r}")
    n_tokens = _validation.positive_int(n_tokens, "n_tokens", minimum=0)
    if n_tokens == 0:
        if count:
            raise ValueError(f"`count` must be 0 when `n_tokens` is 0, got {count!r}")
        return 0.0
    return 1000.0 * count / n_tokens


def line_repeats(text: str, min_chars: int = 8) -> float:
    r"""Fraction of a text's lines that are copies of an earlier line of the same text, in ``[0, 1)``.

    Lines are compared after stripping surrounding whitespace; blank lines and lines shorter than
    ``min_chars`` characters (list bullets, "---", a lone heading word) are not counted at all. 0.0 for a text
    with no countable line. A poem with one refrain line in four stanzas scores 3 of its lines; a model
    stuck repeating two lines for the rest of its output scores close to 1.

    Args:
        text (`str`): decoded text.
        min_chars (`int`, defaults to 8): shortest line that counts, >= 1.

    Returns:
        `float`: repeated lines / counted lines.

    Example:

    >>> line_repeats("A season to cherish,\nA time to forget,\nA season to cherish,\n\nA season to cherish,")
    0.5
    >>> line_repeats("One line only")
    0.0
    """
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a str, got {type(text).__name__}")
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"`min_chars` must be an int >= 1, got {min_chars!r}")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if len(line) >= min_chars]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)
