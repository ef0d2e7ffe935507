"""Where text may end: words, sentence ends and line ends, found on decoded text and mapped back to tokens.

Used by the length mode (a minimum in words) and by the landing (a row that reaches ``max_new_tokens`` is cut
back to its last complete sentence). Words are counted as LongBench-Write counts them: every CJK character and
every run of Latin letters.

A *sentence end* is sentence-ending punctuation (``. ! ? …`` and the CJK full stops), optionally followed by
closing quotes or brackets, that is followed by whitespace -- so ``3.5`` and ``e.g.x`` are not ends; the very
end of a text counts only where the text is known to be complete. A *line end* is a newline. Both are places
where a text may stop without a fragment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["count_words", "cut_point", "ends_sentence", "last_boundary"]

_WORD = re.compile(r"[\u4e00-\u9fff]|[a-zA-Z]+")
_CLOSERS = "\"'”’»)]*_`"
_SENTENCE_END = re.compile(rf"[.!?…。！？][{re.escape(_CLOSERS)}]*$")
_BOUNDARY = re.compile(rf"(?:[.!?…。！？][{re.escape(_CLOSERS)}]*(?=\s)|\n)")


def count_words(text: str) -> int:
    """Words in ``text`` as LongBench-Write counts them: each CJK character and each run of Latin letters.

    Example:

    ```python
    >>> count_words("It's 3 o'clock, said Tom.")
    6

    ```
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    return len(_WORD.findall(text))


def ends_sentence(text: str) -> bool:
    """Whether ``text`` (ignoring trailing spaces and tabs) ends with sentence-ending punctuation or a newline.

    Example:

    ```python
    >>> ends_sentence('He said "yes."'), ends_sentence("the amp un"), ends_sentence("a list\\n")
    (True, False, True)

    ```
    """
    stripped = text.rstrip(" \t")
    return stripped.endswith("\n") or _SENTENCE_END.search(stripped) is not None


def last_boundary(text: str, complete: bool = False) -> int:
    """The character index just after the last sentence or line end of ``text`` (0 when there is none).

    Args:
        text (`str`): the text.
        complete (`bool`, defaults to `False`): the text is finished, so punctuation at its very end is an end
            too (otherwise ``"3."`` could still become ``"3.5"``).

    Example:

    ```python
    >>> text = "The cat sat. Then the do"
    >>> text[: last_boundary(text)]
    'The cat sat.'
    >>> last_boundary("Done.", complete=True), last_boundary("Done.")
    (5, 0)

    ```
    """
    if complete and ends_sentence(text):
        return len(text.rstrip(" \t"))
    end = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
    return end


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def cut_point(tokenizer: Any, ids: Sequence[int], floor: int, prompt_length: int = 0) -> int:
    """Where to cut a row that must stop now: the largest length ``p`` (``floor <= p <= len(ids)``) whose text
    ends a sentence or a line; failing that, the largest that ends a whole word; failing that, ``len(ids)``.

    The text after the row's last token is unknown, so a sentence end at the very end counts (the row is being
    finished there) but a word at the very end does not (``"be af"`` may be half of ``"afraid"``).

    Args:
        tokenizer: decodes the ids.
        ids (`Sequence[int]`): the row's tokens.
        floor (`int`): the shortest allowed result (tokens already final; at least ``prompt_length``).
        prompt_length (`int`, defaults to 0): where the generated text starts; an empty generated text is never
            chosen.

    Example (a word-level tokenizer would do; any ``decode`` works):

    ```python
    >>> class Words:
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(["The", " cat", " sat", ".", " Then", " the", " do"][i] for i in ids)
    >>> cut_point(Words(), [0, 1, 2, 3, 4, 5, 6], floor=0)
    4
    >>> cut_point(Words(), [0, 1, 2, 3, 4, 5, 6], floor=5)
    6

    ```
    """
    n = len(ids)
    if not 0 <= prompt_length <= floor <= n:
        raise ValueError(f"`floor` must be in [prompt_length ({prompt_length}), {n}], got {floor}")
    if floor == n:
        return n
    start = max(prompt_length, floor - 4)
    texts = [_decode(tokenizer, ids[start:p]) for p in range(floor, n + 1)]
    word_end: int | None = None
    for p in range(n, floor - 1, -1):
        text = texts[p - floor]
        if p == start:
            break  # nothing of the generated text would be judged (or kept)
        if p == n:
            if ends_sentence(text):
                return p
            continue
        following = texts[p - floor + 1]
        after = following[len(text) : len(text) + 1] if following.startswith(text) else ""
        if text.rstrip(" \t").endswith("\n") or (after.isspace() and _SENTENCE_END.search(text)):
            return p
        if word_end is None and after.isspace() and text and not text[-1].isspace():
            word_end = p
    return word_end if word_end is not None else n
