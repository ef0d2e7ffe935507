r"""Regular expressions that are only a finite list of words: matched as string phrases.

The chat closings (:data:`~perpetual_logits.text.endings.CHAT_CLOSING_PHRASES`) are written as regular
expressions for brevity -- ``(?i)(?<!\w)(?:best|kind|warm|warmest)\s+regards(?!\w)`` -- but each stands for a few
dozen strings at most. As strings they join the Aho-Corasick automata of the string phrases in
:class:`~perpetual_logits.text.phrase_stream.PhraseIndex`: whether a piece of text may begin one of them is then
answered from what earlier steps found for the same text, and no regular expression is searched for them at all.

:func:`regex_words` reads a pattern of this shape, and nothing wider:

* ``(?<!\w)`` first and ``(?!\w)`` last (a whole-word match, as a string phrase with word boundaries), the whole
  pattern optionally case-insensitive (``(?i)`` or ``regex.IGNORECASE``);
* between them: literal characters (letters, digits, escaped punctuation), ``\s+`` between words, groups
  ``(?:a|b)`` and ``(...)``, and ``?`` after a character or a group.

Such a pattern matches exactly the texts of its words with each ``\s+`` read as a run of whitespace -- the string
phrases' own rule (see :mod:`perpetual_logits.text.matcher`): a string phrase ``"best regards"`` with word
boundaries is the pattern ``(?<!\w)best\s+regards(?!\w)``. Anything else (sets, ``.``, other quantifiers, anchors,
lookarounds, backreferences, a bare ``\s`` or a literal space, which match a fixed count of whitespace) keeps the
pattern a regular expression.
"""

from __future__ import annotations

from typing import Any

import regex

from .matcher import _WORD

__all__ = ["regex_words"]

_HEAD = r"(?<!\w)"
_TAIL = r"(?!\w)"
_SPACE = " "  # a run of whitespace in a word list (the text is matched with its runs collapsed to one space)
_MOST_WORDS = 256  # words one pattern may stand for; more keeps it a regular expression
_LITERAL_ESCAPES = frozenset("!\"#%&',-./:;<=>@_`~ ")  # escaped punctuation that stands for itself
_SPECIAL = frozenset(".^$*+?{}[]\\|()")
_ALLOWED_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.V0


class _NotWords(Exception):
    """The pattern is not a finite list of words (of the shape above)."""


def regex_words(pattern: Any) -> tuple[list[str], bool] | None:
    r"""The words a whole-word pattern stands for, and whether it ignores case; ``None`` when it is not such a list.

    Args:
        pattern: a compiled ``regex`` pattern.

    Returns:
        `tuple[list[str], bool] | None`: the words (each ``\s+`` as one space, in the order the pattern lists
        them, without repeats), and whether case is ignored.

    Example:

    ```python
    >>> regex_words(regex.compile(r"(?i)(?<!\w)(?:best|kind)\s+regards(?!\w)"))
    (['best regards', 'kind regards'], True)
    >>> regex_words(regex.compile(r"(?<!\w)(?:i\s+)?hope\s+it\s+helps!(?!\w)"))
    (['i hope it helps!', 'hope it helps!'], False)
    >>> regex_words(regex.compile(r"(?<!\w)chapter\s+\d+(?!\w)")) is None  # \d+: not a finite list
    True

    ```
    """
    source = pattern.pattern
    if not isinstance(source, str) or pattern.flags & ~_ALLOWED_FLAGS:
        return None
    ignore_case = bool(pattern.flags & regex.IGNORECASE)
    if source.startswith("(?i)"):
        source, ignore_case = source[4:], True
    if not (source.startswith(_HEAD) and source.endswith(_TAIL)):
        return None
    body = source[len(_HEAD) : len(source) - len(_TAIL)]
    try:
        # One sequence: a "|" outside every group would leave the boundaries to its first and last alternatives.
        words, end = _sequence(body, 0)
        if end != len(body):
            return None  # a top-level "|", or a ")" without its group
    except _NotWords:
        return None
    kept = list(dict.fromkeys(words))
    for word in kept:
        # A whole word: it begins with a word character (the boundary before it is one), and its whitespace runs
        # stand between characters (a run at an edge, or two runs in a row, would need a count of whitespace).
        if not word or not _WORD.match(word[0]) or word[-1] == _SPACE or 2 * _SPACE in word:
            return None
    return kept, ignore_case


def _alternatives(source: str, i: int) -> tuple[list[str], int]:
    """The words of the alternatives from ``source[i]`` to the end of their group (or of ``source``)."""
    words: list[str] = []
    while True:
        sequence, i = _sequence(source, i)
        words += sequence
        if len(words) > _MOST_WORDS:
            raise _NotWords
        if i < len(source) and source[i] == "|":
            i += 1
            continue
        return words, i


def _sequence(source: str, i: int) -> tuple[list[str], int]:
    """The words of the items from ``source[i]`` up to a ``|``, a ``)`` or the end."""
    words = [""]
    while i < len(source) and source[i] not in "|)":
        options, i = _item(source, i)
        if source.startswith("?", i):
            if source.startswith(("??", "?+"), i):
                raise _NotWords  # lazy or possessive: refused rather than read
            options = [*options, ""]
            i += 1
        words = [word + option for word in words for option in options]
        if len(words) > _MOST_WORDS:
            raise _NotWords
    return words, i


def _item(source: str, i: int) -> tuple[list[str], int]:
    """One character, escape or group at ``source[i]``: its words and the index after it."""
    char = source[i]
    if char == "(":
        if source.startswith("(?:", i):
            start = i + 3
        elif source.startswith("(?", i):
            raise _NotWords  # lookarounds, flags, named groups
        else:
            start = i + 1
        words, end = _alternatives(source, start)
        if not source.startswith(")", end):
            raise _NotWords
        return words, end + 1
    if char == "\\":
        escaped = source[i + 1 : i + 2]
        if escaped == "s" and source.startswith("+", i + 2) and not source.startswith(("++", "+?"), i + 3):
            return [_SPACE], i + 3
        if escaped in _LITERAL_ESCAPES and escaped != " ":
            return [escaped], i + 2
        raise _NotWords  # \d, \w, \b, \n, a bare \s: classes, anchors and whitespace of a fixed count
    if char in _SPECIAL or char.isspace():
        raise _NotWords  # quantifiers, sets, anchors, "."; a literal space matches exactly one space
    if source.startswith(("*", "+", "{"), i + 1):
        raise _NotWords
    return [char], i + 1
