"""Banned phrases in decoded text: spelled end markers and ending phrases, whatever tokens spell them.

Suppressing the EOS id is not enough: TinyStories-656K writes its end marker ``<|end_story|>`` as ordinary
pieces (``<|``, ``end``, ``_story``, ``|>``) and Llama 2 writes "The End". :class:`PhraseMatcher` watches the
*decoded text* of a row, so a phrase is caught however the tokenizer split it, and says

* which token a completed phrase began in (the position to rewind to and the token to forbid there), and
* how many trailing tokens might be the beginning of a phrase (the tokens a streamer must hold back).

The phrases themselves (:func:`~perpetual_logits.text.endings.default_end_phrases`, the ending catalogue) live in
:mod:`perpetual_logits.text.endings`.

Matching rules for string phrases (regular expressions follow their own rules, see :class:`PhraseMatcher`):

* **Case:** case-sensitive by default. Capitalisation is what separates "The End" from "at the end of the
  day", so :data:`ENDING_PHRASES` lists each casing it bans. ``case_sensitive=False`` ignores case.
* **Whitespace:** leading and trailing whitespace of a phrase is dropped; each run of whitespace inside a
  phrase matches any non-empty run of whitespace (spaces, tabs, newlines) in the text.
* **Word boundaries:** a phrase that starts with a word character (letter, digit, ``_``) does not match
  right after a word character, and one that ends with a word character does not match right before one:
  "The End" matches in "The End." and "The End\\n" but not in "The Endless road" or "OnThe End". Such a
  match is therefore only *confirmed* once the character after it is known; until then its tokens are held
  back. Phrases with non-word edges such as ``<|end_story|>`` match anywhere.
* **Text:** the text is what ``tokenizer.decode(ids, skip_special_tokens=False)`` gives, so a real special
  token counts with its text too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import regex  # a dependency of transformers; unlike `re` it can tell a partial match at the end of the text
import torch

from .. import _validation
from .endings import Decoder

__all__ = ["PhraseMatch", "PhraseMatcher", "PhraseScan"]


@dataclass(frozen=True)
class PhraseMatch:
    """A banned phrase found in a row's text.

    Attributes:
        start (`int`): index, in the row's token ids (prompt included), of the first token whose text overlaps
            the match: cut the row back to ``start`` tokens and forbid ``ids[start]`` at that position. Never
            less than ``prompt_length``: a phrase that began inside the prompt gives the first generated token.
        phrase (`str`): the phrase as given (for a regular expression, its pattern).
        text (`str`): the matched text.
    """

    start: int
    phrase: str
    text: str


@dataclass(frozen=True)
class PhraseScan:
    """What :meth:`PhraseMatcher.scan` found in one row.

    Attributes:
        match (`PhraseMatch` or `None`): a newly completed phrase, or ``None``.
        hold (`int`): how many trailing tokens must not be shown yet, because their text is, or may become,
            part of a phrase. With a match it reaches back to the match's start. Never more than the number
            of generated tokens. A streamer shows tokens up to ``max(shown, len(ids) - hold)``: ``hold`` can
            reach over tokens already shown when the decoder rewrites earlier text (a byte-fallback "»"
            that the next, invalid byte turns into U+FFFD), but such text can never complete a phrase.
    """

    match: PhraseMatch | None
    hold: int


class CompiledPhrase:
    """One phrase, ready for :meth:`PhraseMatcher.scan`. A string phrase's regular expression is compiled on
    first use: the incremental matcher (``PhraseStream``) never needs it, and compiling 10,000 of them takes
    seconds."""

    __slots__ = ("_pattern", "flags", "literal", "source", "stable_at_end")

    def __init__(self, source: str, pattern: Any, stable_at_end: bool, literal: bool = False, flags: int = 0):
        self.source = source  # the phrase as given, or the pattern's text
        self._pattern = pattern  # a `regex` pattern, or (text, head, tail) of a string phrase until first use
        self.flags = flags
        # A complete match that ends exactly at the end of the text stays a match whatever text follows (a
        # literal phrase whose last character needs no word-boundary check). Otherwise it is only confirmed by
        # the next character.
        self.stable_at_end = stable_at_end
        self.literal = literal  # a string phrase (matched by the automaton of PhraseStream), not a regex

    @property
    def pattern(self) -> Any:
        if isinstance(self._pattern, tuple):
            self._pattern = regex.compile(_string_pattern(*self._pattern), self.flags)
        return self._pattern


_WORD = regex.compile(r"\w")
_SPACES = re.compile(r"\s+")
_SPACES_SPLIT = re.compile(r"(\s+)")
_REPLACEMENT = "\ufffd"  # what decoders show for an incomplete UTF-8 sequence (byte-fallback, byte-level BPE)
_SLACK_CHARS = 16  # extra text decoded before the longest phrase: whitespace runs, lookbehind, a ragged start
_DEFAULT_REGEX_CHARS = 64


def _compile_string(phrase: str, case_sensitive: bool, word_boundaries: bool) -> tuple[CompiledPhrase, int]:
    text = phrase.strip()
    if not text:
        raise ValueError(f"`phrases` must not contain empty or whitespace-only strings, got {phrase!r}")
    head = word_boundaries and bool(_WORD.match(text[0]))
    tail = word_boundaries and bool(_WORD.match(text[-1]))
    flags = regex.V0 | (0 if case_sensitive else regex.IGNORECASE)
    # The longest text a match can span: whitespace runs count as one character; the slack covers more.
    length = len(_SPACES.sub(" ", text))
    return CompiledPhrase(phrase, (text, head, tail), stable_at_end=not tail, literal=True, flags=flags), length


def _string_pattern(text: str, head: bool, tail: bool) -> str:
    """The regular expression of a string phrase (see the module notes)."""
    parts = [r"\s+" if piece.isspace() else regex.escape(piece) for piece in _SPACES_SPLIT.split(text) if piece]
    return ("(?<!\\w)" if head else "") + "".join(parts) + ("(?!\\w)" if tail else "")


def _compile_pattern(pattern: Any) -> CompiledPhrase:
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise ValueError(f"`phrases` patterns must be str patterns, got the bytes pattern {pattern!r}")
        compiled = regex.compile(pattern.pattern, pattern.flags)
    else:
        compiled = pattern
    if compiled.match("") is not None:
        raise ValueError(f"`phrases` pattern {compiled.pattern!r} matches the empty string")
    return CompiledPhrase(compiled.pattern, compiled, stable_at_end=False)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case: one text extends the other
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class _Window:
    """The decoded text of a row's last tokens, and the map from characters back to tokens."""

    def __init__(self, decoder: Decoder, ids: list[int], start: int, text: str) -> None:
        self.decoder = decoder
        self.ids = ids
        self.start = start  # index in the row of the window's first token
        self.tokens = ids[start:]
        self.text = text
        self._prefixes: dict[int, str] = {0: "", len(self.tokens): text}

    def prefix(self, j: int) -> str:
        """Text of the window's first ``j`` tokens. Always decoded from the same first token, so that a
        decoder that drops the first token's leading space (SentencePiece) treats every prefix alike."""
        cached = self._prefixes.get(j)
        if cached is None:
            cached = _decode(self.decoder, self.tokens[:j])
            self._prefixes[j] = cached
        return cached

    def chars_before(self, j: int) -> int:
        """Characters of the window text fully produced by its first ``j`` tokens."""
        j = max(0, min(j, len(self.tokens)))
        return _common_prefix(self.prefix(j), self.text)

    def seen_before(self, j: int) -> int:
        """Characters a scan of the first ``j`` tokens could already match on: :meth:`chars_before`, less
        trailing U+FFFD, which such a scan does not treat as text yet."""
        j = max(0, min(j, len(self.tokens)))
        return min(self.chars_before(j), len(self.prefix(j).rstrip(_REPLACEMENT)))

    def cut(self, char: int) -> int:
        """Row index of the first token whose text overlaps character ``char`` or later.

        That is the largest ``j`` whose prefix text is a prefix of ``text[:char]``: keeping ``j`` tokens
        keeps nothing of the text from ``char`` on, not even the leading bytes of a character that later
        tokens complete (decoders show those as U+FFFD, which is not a prefix of the real character).
        """
        target = self.text[:char]
        for j in range(len(self.tokens), -1, -1):
            text = self.prefix(j)
            if len(text) <= char and target.startswith(text):
                return self.start + j
        return self.start  # not reached: the empty prefix always qualifies


def _decode(decoder: Decoder, ids: list[int]) -> str:
    return decoder.decode(ids, skip_special_tokens=False)


def _decode_many(decoder: Decoder, rows: list[list[int]]) -> list[str]:
    batch_decode = getattr(decoder, "batch_decode", None)
    if callable(batch_decode):  # transformers tokenizers: one call into the Rust decoder for all rows
        return list(batch_decode(rows, skip_special_tokens=False))
    decode_batch = getattr(decoder, "decode_batch", None)
    if callable(decode_batch):  # a bare `tokenizers.Tokenizer`
        return list(decode_batch(rows, skip_special_tokens=False))
    return [_decode(decoder, row) for row in rows]


def _as_ids(token_ids: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(
                f"`{name}` must be a 1-D integer tensor or a list of ints, got a tensor of dtype "
                f"{token_ids.dtype} and shape {tuple(token_ids.shape)}"
            )
        return [int(i) for i in token_ids.tolist()]
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise ValueError(f"`{name}` must be a 1-D integer tensor or a list of ints, got {type(token_ids).__name__}")
    ids = list(token_ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"`{name}` must contain non-negative ints, got {i!r}")
    return ids


class PhraseMatcher:
    r"""Find banned phrases in the decoded text of a generated row, whatever tokens spelled them.

    Call :meth:`scan` once per generated token with the row's token ids. It decodes only a bounded tail of
    the row (the longest phrase plus some slack, in characters), so a call costs the same at token 10 and
    at token 10,000. It reports:

    * ``match``: a phrase completed by the newest token(s), with the index of the token where it began: the
      first token whose decoded text overlaps the match (a token like ``".▁The▁"`` that starts before the
      phrase counts). Character offsets are mapped back to tokens by decoding prefixes of the tail, so
      tokenizers whose pieces depend on their neighbours (SentencePiece's leading space, byte-fallback and
      byte-level BPE pieces that each hold part of a UTF-8 character) map correctly;
    * ``hold``: how many trailing tokens a streamer must hold back because their text is the beginning of a
      phrase, a phrase whose end is not yet confirmed (``"The End"`` might become ``"The Endless"``), or
      bytes of an unfinished character.

    Phrases are strings (see the module notes for case, whitespace and word boundaries) or compiled regular
    expressions (``re`` or ``regex`` patterns). Regular expressions keep their own flags (``case_sensitive``
    and ``word_boundaries`` do not apply to them) and are treated conservatively:

    * a regex match that ends exactly at the end of the text is held back until one more character arrives
      (the pattern might match more, or a lookahead might fail), unless ``final=True``;
    * partial matches use the ``regex`` module's partial matching, so a text end that could still grow into
      a match is held back;
    * ``^`` and ``\A`` refer to the start of the decoded tail, not of the row: use ``(?m)^`` for line starts;
    * matches longer than ``max_match_chars`` (default 64 when there are regex phrases) are not found.

    Args:
        phrases (`Sequence[str | re.Pattern]`): the banned phrases, e.g. :func:`default_end_phrases`.
        tokenizer (`PreTrainedTokenizerBase` or `tokenizers.Tokenizer`): decodes the row's token ids.
        case_sensitive (`bool`, defaults to `True`): match string phrases with their exact case.
        word_boundaries (`bool`, defaults to `True`): string phrases do not match inside longer words.
        max_match_chars (`int`, *optional*): the longest text a match can span, in characters. Defaults to the
            longest string phrase, or 64 when there are regular expressions, whichever is larger.

    Example:

    ```python
    >>> from tokenizers import Tokenizer, decoders, models
    >>> vocab = {"<unk>": 0, "Once": 1, "Ġupon": 2, "ĠThe": 3, "ĠE": 4, "nd": 5, ".": 6, "less": 7}
    >>> tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    >>> tok.decoder = decoders.ByteLevel()
    >>> matcher = PhraseMatcher(["The End"], tok)
    >>> matcher.scan([1, 2, 3, 4, 5])  # "Once upon The End": may still become "The Endless", so held back
    PhraseScan(match=None, hold=3)
    >>> matcher.scan([1, 2, 3, 4, 5, 6]).match  # "... The End.": rewind to token 2 (" The") and ban it
    PhraseMatch(start=2, phrase='The End', text='The End')
    >>> matcher.scan([1, 2, 3, 4, 5, 7])  # "... The Endless": an innocent word, nothing held
    PhraseScan(match=None, hold=0)

    ```
    """

    def __init__(
        self,
        phrases: Sequence[str | re.Pattern[str]],
        tokenizer: Any,
        case_sensitive: bool = True,
        word_boundaries: bool = True,
        max_match_chars: int | None = None,
    ) -> None:
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"`tokenizer` must have a decode() method, got {type(tokenizer).__name__}")
        for name, flag in (("case_sensitive", case_sensitive), ("word_boundaries", word_boundaries)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be a bool, got {flag!r}")
        if isinstance(phrases, (str, bytes, re.Pattern)) or not isinstance(phrases, Sequence):
            raise ValueError(
                "`phrases` must be a non-empty list of strings or compiled regular expressions, "
                f"got {type(phrases).__name__}"
            )
        if not phrases:
            raise ValueError("`phrases` must be a non-empty list of strings or compiled regular expressions")
        # Empty / whitespace-only strings and regexes that match the empty string are refused here, by name.
        _validation.phrases(phrases, "phrases")
        compiled: list[CompiledPhrase] = []
        longest = 0
        has_regex = False
        for phrase in phrases:
            if isinstance(phrase, str):
                item, length = _compile_string(phrase, case_sensitive, word_boundaries)
                longest = max(longest, length)
            elif isinstance(phrase, (re.Pattern, regex.Pattern)):
                item = _compile_pattern(phrase)
                has_regex = True
            else:
                raise ValueError(
                    f"`phrases` must contain strings or compiled regular expressions, got {phrase!r} "
                    f"({type(phrase).__name__})"
                )
            compiled.append(item)
        if max_match_chars is None:
            max_match_chars = max(longest, _DEFAULT_REGEX_CHARS if has_regex else 0)
        else:
            max_match_chars = _validation.positive_int(max_match_chars, "max_match_chars")
        self.tokenizer = tokenizer
        self.phrases: tuple[str, ...] = tuple(c.source for c in compiled)
        self.case_sensitive = case_sensitive
        self.word_boundaries = word_boundaries
        self.max_match_chars: int = max(max_match_chars, longest)
        self.compiled = compiled
        # Characters of text that every scan must see: the longest match plus slack.
        self.need_chars = self.max_match_chars + _SLACK_CHARS

    def __repr__(self) -> str:
        return f"PhraseMatcher({len(self.phrases)} phrases, max_match_chars={self.max_match_chars})"

    # -- public ------------------------------------------------------------------------------------------
    def scan(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        prompt_length: int = 0,
        new_tokens: int | None = 1,
        final: bool = False,
    ) -> PhraseScan:
        """Look at one row after new tokens were appended.

        Args:
            token_ids (`list[int]` or 1-D tensor): the row's tokens, prompt included.
            prompt_length (`int`, defaults to 0): how many of them are the prompt. Matches lying wholly in the
                prompt are ignored and nothing of the prompt is held back.
            new_tokens (`int` or `None`, defaults to 1): how many tokens were appended since the previous
                call. Only matches *confirmed* by them are reported, so a match the caller decided to keep is
                not reported again. ``None``: every match in the decoded tail.
            final (`bool`, defaults to `False`): no token will follow, so a match at the very end of the text
                needs no confirmation. Use it for the last call of a row instead of, not after, the normal one.

        Returns:
            `PhraseScan`: the new match (or ``None``) and the number of tokens to hold back.
        """
        ids, prompt_length, new_tokens = self._check(token_ids, prompt_length, new_tokens, final)
        if len(ids) == prompt_length:
            return PhraseScan(None, 0)
        start = self._first_window_start(ids, prompt_length)
        window = self._window(ids, start, _decode(self.tokenizer, ids[start:]), prompt_length)
        return self._analyse(window, prompt_length, new_tokens, final)

    def scan_batch(
        self,
        rows: Sequence[Sequence[int]] | torch.Tensor,
        prompt_length: int | Sequence[int] = 0,
        new_tokens: int | None = 1,
        final: bool = False,
    ) -> list[PhraseScan]:
        """:meth:`scan` for several rows, decoding all their tails in one tokenizer call.

        Args:
            rows (`list[list[int]]` or 2-D tensor): each row's tokens, prompt included (rows may differ in
                length when given as lists).
            prompt_length (`int` or `list[int]`, defaults to 0): per row, or one value for all rows.
            new_tokens (`int` or `None`, defaults to 1): as in :meth:`scan`, for every row.
            final (`bool`, defaults to `False`): as in :meth:`scan`, for every row.

        Returns:
            `list[PhraseScan]`: one per row.
        """
        if isinstance(rows, torch.Tensor):
            if rows.dim() != 2:
                raise ValueError(f"`rows` must have shape (batch, length), got {tuple(rows.shape)}")
            row_list: list[Any] = list(rows)
        elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)):
            row_list = list(rows)
        else:
            raise ValueError(f"`rows` must be a 2-D tensor or a list of token id lists, got {type(rows).__name__}")
        if isinstance(prompt_length, int) and not isinstance(prompt_length, bool):
            prompts: list[Any] = [prompt_length] * len(row_list)
        elif isinstance(prompt_length, Sequence) and len(prompt_length) == len(row_list):
            prompts = list(prompt_length)
        else:
            raise ValueError(
                f"`prompt_length` must be an int or a list with one int per row ({len(row_list)}), "
                f"got {prompt_length!r}"
            )
        checked = [self._check(r, p, new_tokens, final) for r, p in zip(row_list, prompts)]
        starts = [self._first_window_start(ids, p) for ids, p, _ in checked]
        todo = [b for b, (ids, p, _) in enumerate(checked) if len(ids) > p]
        texts = _decode_many(self.tokenizer, [checked[b][0][starts[b] :] for b in todo])
        results = [PhraseScan(None, 0)] * len(checked)
        for b, text in zip(todo, texts):
            ids, p, n = checked[b]
            results[b] = self._analyse(self._window(ids, starts[b], text, p), p, n, final)
        return results

    # -- internals ---------------------------------------------------------------------------------------
    def _check(
        self, token_ids: Sequence[int] | torch.Tensor, prompt_length: int, new_tokens: int | None, final: bool
    ) -> tuple[list[int], int, int | None]:
        ids = _as_ids(token_ids, "token_ids")
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
            raise ValueError(f"`prompt_length` must be an int in [0, len(token_ids)], got {prompt_length!r}")
        if not 0 <= prompt_length <= len(ids):
            raise ValueError(f"`prompt_length` must be an int in [0, len(token_ids)={len(ids)}], got {prompt_length}")
        if new_tokens is not None:
            new_tokens = _validation.positive_int(new_tokens, "new_tokens")
        if not isinstance(final, bool):
            raise ValueError(f"`final` must be a bool, got {final!r}")
        return ids, prompt_length, new_tokens

    def _first_window_start(self, ids: list[int], prompt_length: int) -> int:
        # Most tokens decode to at least two characters, so half the needed characters in tokens is a good
        # first guess; _window() widens it when the text turns out too short.
        return max(0, len(ids) - max(8, self.need_chars // 2))

    def _window(self, ids: list[int], start: int, text: str, prompt_length: int) -> _Window:
        """Decode from ``start``; move the start back until the text is long enough (or the row begins)."""
        while start > 0 and len(text) < self.need_chars + len(_decode(self.tokenizer, ids[start : start + 1])):
            start = max(0, start - max(8, len(ids) - start))  # double the window
            text = _decode(self.tokenizer, ids[start:])
        return _Window(self.tokenizer, ids, start, text)

    def _pending(self, item: CompiledPhrase, end: int, body_end: int, final: bool) -> bool:
        """A complete match whose end is not confirmed yet (more text could undo it)."""
        return not final and not item.stable_at_end and end >= body_end

    def _analyse(self, w: _Window, prompt_length: int, new_tokens: int | None, final: bool) -> PhraseScan:
        text = w.text
        generated = len(w.ids) - prompt_length
        # Trailing U+FFFD: bytes of a character that later tokens complete. Not text yet, so not matched, and
        # held back (the finished character might start a phrase).
        body_end = len(text.rstrip(_REPLACEMENT)) if not final else len(text)
        body = text[:body_end]
        # The window's first token may decode differently without its left neighbour (a dropped leading
        # space, half a character): nothing may start inside it unless it is the row's first token.
        head = len(w.prefix(1)) if w.start > 0 else 0

        best: tuple[int, int, CompiledPhrase, str] | None = None  # (token, char, phrase, text)
        new_from: int | None = None
        prompt_chars: int | None = None
        for item in self.compiled:
            # Overlapping matches too: an occurrence the prompt holds must not hide one that the new text completes
            # and that overlaps it ("e E" in the prompt "e E", then "E E" completed by " End").
            for m in item.pattern.finditer(body, head, overlapped=True):
                s, e = m.span()
                if e == s or self._pending(item, e, body_end, final):
                    continue
                # The character that confirmed the match: its last one, or the one after it.
                confirm = e - 1 if item.stable_at_end or e >= body_end else e
                if new_from is None:
                    new_from = 0 if new_tokens is None else w.seen_before(len(w.tokens) - new_tokens)
                    prompt_chars = w.chars_before(prompt_length - w.start)
                if confirm < new_from or e <= (prompt_chars or 0):
                    continue
                token = max(w.cut(s), prompt_length)
                if best is None or (token, s) < (best[0], best[1]):
                    best = (token, s, item, m.group())
        if best is not None:
            token, _, item, matched = best
            return PhraseScan(PhraseMatch(token, item.source, matched), len(w.ids) - token)

        hold_from = body_end if body_end < len(text) else None
        for item in self.compiled:
            pos = head
            while pos <= body_end:
                m = item.pattern.search(body, pos, partial=True)
                if m is None:
                    break
                s, e = m.span()
                if m.partial:
                    if e > s:  # the empty partial match at the very end means nothing
                        hold_from = s if hold_from is None else min(hold_from, s)
                    break
                if e > s and self._pending(item, e, body_end, final):
                    hold_from = s if hold_from is None else min(hold_from, s)
                    break
                pos = s + 1
        if hold_from is None:
            return PhraseScan(None, 0)
        return PhraseScan(None, min(len(w.ids) - w.cut(hold_from), generated))
