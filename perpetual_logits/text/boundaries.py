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

from .text_stream import TokenTexts, rust_backend

__all__ = ["count_words", "cut_point", "ends_sentence", "last_boundary"]

_WORD = re.compile(r"[\u4e00-\u9fff]|[a-zA-Z]+")
_CLOSERS = "\"'”’»)]*_`"
_ENDERS = frozenset(".!?…。！？")
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
    if stripped.endswith("\n"):
        return True
    # sentence punctuation, then any closing quotes or brackets (no regex: this runs per row per token)
    head = stripped.rstrip(_CLOSERS)
    return head[-1:] in _ENDERS and head != ""


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
    backend = rust_backend(tokenizer)  # the Rust tokenizer itself decodes the same, several times faster
    if backend is not None:
        return str(backend.decode(list(ids), skip_special_tokens=True))
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def _encode(tokenizer: Any, text: str) -> list[int]:
    backend = rust_backend(tokenizer)  # the Rust tokenizer encodes the same without the Python wrapper's cost
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _sentence_end_inside(piece: str) -> int:
    """The length of ``piece``'s head up to its last sentence end followed by whitespace (0: none)."""
    end = 0
    for m in _BOUNDARY.finditer(piece):
        if m.group() != "\n" and m.end() < len(piece):
            end = m.end()
    return end


def _spell(
    tokenizer: Any, ids: Sequence[int], start: int, floor: int, head: str, limit: int, text: str
) -> tuple[int, list[int]] | None:
    """Keep ``ids[:q]`` and append tokens so that the text of ``ids[start:]`` (``text``, already decoded) gains
    exactly ``head``: first without touching ``ids`` (``q = len(ids)``), else re-spelling the last few tokens with
    it (``q >= floor``), with at most ``limit`` tokens in all (the row's length: a cut never makes it longer).
    ``None`` when the tokenizer cannot spell it exactly."""
    target = text + head
    for q in range(len(ids), max(floor, start, len(ids) - 4) - 1, -1):
        kept = text if q == len(ids) else _decode(tokenizer, ids[start:q])
        if not target.startswith(kept):
            continue
        segment = target[len(kept) :]
        encoded = _encode(tokenizer, segment)
        candidates = [encoded]
        if len(encoded) > 1 and not _decode(tokenizer, encoded[:1]).strip():
            candidates.append(encoded[1:])  # SentencePiece's dummy prefix ("▁") before a word continued here
        convert = getattr(tokenizer, "convert_tokens_to_ids", None)
        if convert is not None:  # a piece spelled alone ("." rather than the encoder's "▁.")
            single = convert(segment)
            if isinstance(single, int) and single != getattr(tokenizer, "unk_token_id", None):
                candidates.insert(0, [single])
        for extra in candidates:
            # Never longer than the row was: a row cut at max_new_tokens must stay within it.
            if extra and q + len(extra) <= limit and _decode(tokenizer, [*ids[start:q], *extra]) == target:
                return q, extra
    return None


def cut_point(
    tokenizer: Any, ids: Sequence[int], floor: int, prompt_length: int = 0, ends: Sequence[int] | None = None
) -> tuple[int, list[int]]:
    """Where to cut a row that must stop now: the latest point at or after ``floor`` where its text ends a
    sentence or a line; failing that, the latest whole word; failing that, nowhere (``len(ids)``).

    A sentence end may lie inside a token (SentencePiece vocabularies have pieces like ``".▁The▁"``): the row
    is then cut before that token and the head of its text (``"."``) is spelled with other tokens, when the
    tokenizer can spell it exactly. The text after the row's last token is unknown, so a sentence end at the very
    end counts (the row is being finished there) but a word at the very end does not (``"be af"`` may be half
    of ``"afraid"``).

    Args:
        tokenizer: decodes (and, to spell a sentence end inside a token, encodes) text.
        ids (`Sequence[int]`): the row's tokens.
        floor (`int`): the shortest allowed result (tokens already final; at least ``prompt_length``).
        prompt_length (`int`, defaults to 0): where the generated text starts; an empty generated text is never
            chosen.
        ends (`Sequence[int]`, *optional*): where the caller saw the text end a sentence or line (lengths, as
            :class:`~perpetual_logits.backstep.landing.RowText` keeps them): those are tried first, latest first,
            and the first that holds is the answer; the search back token by token runs only when none does.

    Returns:
        `tuple[int, list[int]]`: the tokens to keep (``ids[:length]``) and the tokens to append after them.

    Example (any object with ``decode`` and ``encode`` works):

    ```python
    >>> class Words:
    ...     pieces = ["The", " cat", " sat", ".", " Then", " the", " do"]
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(self.pieces[i] for i in ids)
    ...     def encode(self, text, add_special_tokens=False):
    ...         return [self.pieces.index(text)] if text in self.pieces else []
    >>> cut_point(Words(), [0, 1, 2, 3, 4, 5, 6], floor=0)
    (4, [])
    >>> cut_point(Words(), [0, 1, 2, 3, 4, 5, 6], floor=5)
    (6, [])

    ```
    """
    n = len(ids)
    if not 0 <= prompt_length <= floor <= n:
        raise ValueError(f"`floor` must be in [prompt_length ({prompt_length}), {n}], got {floor}")
    if floor == n:
        return n, []
    start = max(prompt_length, floor - 4)
    # Decoded from the end back, and only as far as the search goes (a sentence end is usually a few tokens
    # back, while `floor` may lie a hundred tokens back); a point is judged on the few tokens before it.
    tail_begin, tail = _judged_text(tokenizer, ids, start, n)
    if ends_sentence(tail):
        return n, []
    # The sentence ends the caller kept track of, latest first: the first that holds is the answer (two short
    # decodes each, where the search below decodes once per token back to it).
    for p in sorted((e for e in ends if floor <= e < n), reverse=True) if ends else ():
        if p == start:
            break
        begin, text = _judged_text(tokenizer, ids, start, p)
        found, _ = _end_at(tokenizer, ids, p, begin, floor, n, text, _decode(tokenizer, ids[begin : p + 1]))
        if found is not None:
            return found
    following = tail if tail_begin == start else _decode(tokenizer, ids[start:n])
    word_end: int | None = None
    for p in range(n - 1, floor - 1, -1):
        text = _decode(tokenizer, ids[start:p])  # and `following`: the text up to p + 1
        found, spaced = _end_at(tokenizer, ids, p, start, floor, n, text, following)
        if found is not None:
            return found
        if p == start:
            break  # nothing of the generated text would be judged (or kept)
        if word_end is None and spaced:
            word_end = p
        following = text
    return (word_end, []) if word_end is not None else (n, [])


#: Tokens decoded before a point that :func:`cut_point` judges (more where the tokenizer requires, see
#: :func:`_judged_text`): whether a text ends a sentence there depends on its last few characters only, while a
#: decode takes time per token decoded (a row at its limit is judged from up to a hundred tokens back).
_CONTEXT = 8


def _judged_text(tokenizer: Any, ids: Sequence[int], start: int, end: int) -> tuple[int, str]:
    """The text of ``ids[begin:end]`` and ``begin``: at most :data:`_CONTEXT` tokens before ``end``, not before
    ``start``, judged as the text of ``ids[start:end]`` would be.

    A later start changes only how the first token reads (a SentencePiece word loses its leading space) when that
    token is whole characters and the decoder reads tokens on their own (see
    :meth:`~perpetual_logits.text.text_stream.TokenTexts.reads_alone`): the window starts at the nearest such
    token, else at ``start``. A window of whitespace and closing quotes only says nothing about the text before
    it: then it starts at ``start`` too."""
    begin = end - _CONTEXT
    if begin > start:
        texts = TokenTexts.of(tokenizer)
        if not texts.local:
            begin = start  # no token of its reads alone
        while begin > start and not texts.reads_alone(int(ids[begin])):
            begin -= 1
    if begin <= start:
        return start, _decode(tokenizer, ids[start:end])
    text = _decode(tokenizer, ids[begin:end])
    if text.strip().strip(_CLOSERS).strip():
        return begin, text
    return start, _decode(tokenizer, ids[start:end])


def _end_at(
    tokenizer: Any, ids: Sequence[int], p: int, start: int, floor: int, n: int, text: str, following: str
) -> tuple[tuple[int, list[int]] | None, bool]:
    """Whether :func:`cut_point` may cut at ``p`` (``text``: the text of ``ids[start:p]``, ``following``: of
    ``ids[start:p + 1]``): the cut, or ``None``; and whether a word ends at ``p``."""
    piece = following[len(text) :] if following.startswith(text) else ""
    inside = _sentence_end_inside(piece)
    if inside and (p > start or text):
        spelled = _spell(tokenizer, ids[:p], start, floor, piece[:inside], n, text)
        if spelled is not None:
            return spelled, True
    if p == start:
        return None, False
    spaced = piece[:1].isspace() or (text[-1:].isspace() and text.strip() != "")
    stripped = text.rstrip(" \t")
    if stripped.endswith("\n") or (spaced and ends_sentence(stripped)):
        return (p, []), spaced
    return None, spaced


def sentence_end_token_ids(tokenizer: Any) -> frozenset[int]:
    r"""Ids of every vocabulary token whose own text ends a sentence or a line (see :func:`ends_sentence`): where
    a backend that sees tokens, not text (the vLLM processor), judges that a row is at a sentence end.

    Args:
        tokenizer: anything with ``decode(list[int])`` and ``len()``.

    Example:

    ```python
    >>> class Vocab:
    ...     pieces = ["a", ".", " b", "!\"", "\n"]
    ...     def __len__(self):
    ...         return len(self.pieces)
    ...     def decode(self, ids, **kwargs):
    ...         return "".join(self.pieces[i] for i in ids)
    >>> sorted(sentence_end_token_ids(Vocab()))
    [1, 3, 4]

    ```
    """
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise ValueError(f"`tokenizer` must have a decode() method, got {type(tokenizer).__name__}")
    return frozenset(i for i in range(len(tokenizer)) if ends_sentence(str(decode([i]))))
