"""Incremental detokenization of one row: its text grows by the new token's text, and shrinks with a rewind.

Decoding a row's tail again after every token costs a tokenizer call over dozens of tokens plus the prefix
decodes that map characters back to tokens. :class:`TextStream` instead decodes, per new token, a small window:
the last few tokens after one *anchor* token, whose text is then cut off. The anchor gives the window's first
token its real left neighbour (a SentencePiece piece keeps its leading space, a byte-level piece that ends a
UTF-8 character sees its start), so the window's text is exactly that part of the row's text. When the
window's text extends what the row had, the new characters are appended (one decode of about eight tokens);
otherwise -- bytes of an unfinished character, or bytes that turn out invalid and make the decoder rewrite
text it had shown (a byte-fallback "»" that the next byte turns into U+FFFD) -- each token of the window is
decoded as a prefix to find which characters are its own, as ``PhraseMatcher.scan`` does. The usual token --
the text so far whole, neither it nor the token before it a byte-fallback piece -- needs no window: its text is
what it adds after that one neighbour, kept per tokenizer by :class:`TokenTexts` (shared with every other reader of
the tokenizer) per pair of tokens, or per token when the decoder reads each token on its own.

After every token the stream records the row's character count, the map from characters back to tokens and
also the snapshot a rewind restores: cutting the row back to ``n`` tokens keeps the characters of those
tokens, and the window before the cut is decoded once more.

Tokens whose bytes do not yet form a whole character are *pending*: their text is not part of the row's text
yet (a decoder shows it as trailing U+FFFD), and the first token whose text overlaps a character is the first
token whose prefix text is not a prefix of the text up to that character.

Why not ``tokenizers``' :class:`~tokenizers.decoders.DecodeStream` (about 1.7 µs a token against a few µs
here, smoke timings on a loaded machine): its state cannot be cut back to a token (a rewind would re-feed it),
a prefill that ends inside a character makes it repeat text, and it raises on text the decoder rewrites,
where the row's text must follow what ``tokenizer.decode`` says.
"""

from __future__ import annotations

import json
import re
import weakref
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

__all__ = ["TextStream", "TokenTexts", "rust_backend"]

_REPLACEMENT = "\ufffd"  # what decoders show for an incomplete UTF-8 sequence
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_WINDOW = 8  # tokens decoded per step (after the anchor): enough for any piece to see its neighbours


_PAIRS = 1 << 15  # token pairs whose text is kept per tokenizer (the first seen), so memory stays bounded


def rust_backend(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` whose decode equals ``tokenizer.decode(ids, skip_special_tokens=False)``."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # transformers cleans up tokenization spaces (" ." -> ".") after the backend when asked to.
    if isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend
    return None


class TokenTexts:
    """What a tokenizer's tokens read as, shared by every row and every reader of that tokenizer (a token's text
    never changes, and rows keep writing the same words): each token's text alone, and the text a token adds
    after a given left neighbour, special tokens' text included (``tokenizer.decode(ids,
    skip_special_tokens=False)``).

    Args:
        tokenizer (`PreTrainedTokenizerBase` or `tokenizers.Tokenizer`): decodes the tokens.

    Example:

    ```python
    >>> from tokenizers import Tokenizer, decoders, models
    >>> tok = Tokenizer(models.BPE({"<unk>": 0, "Once": 1, "Ġupon": 2}, [], unk_token="<unk>"))
    >>> tok.decoder = decoders.ByteLevel()
    >>> texts = TokenTexts.of(tok)
    >>> texts.lead(2), texts.after_pair(1, 2), TokenTexts.of(tok) is texts
    (' upon', ' upon', True)

    ```
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = rust_backend(tokenizer)
        self.leads: dict[int, str] = {}  # token id -> its text alone
        self.after: dict[int, str] = {}  # neighbour << 32 | token id -> the text the token adds after it
        # When the decoder reads each token on its own (see _reads_tokens_alone), a plain token adds the same
        # text after every plain neighbour: learned from its first pair, then no pair of it is decoded again.
        self.local = _reads_tokens_alone(self.backend)
        added = self.backend.get_added_tokens_decoder() if self.backend is not None and self.local else {}
        self.added = frozenset(int(i) for i in added)
        self.follows: dict[int, str] = {}  # token id -> the text it adds after any plain neighbour

    @classmethod
    def of(cls, tokenizer: Any) -> TokenTexts:
        """The texts of ``tokenizer``, kept as long as it lives (a tokenizer that cannot be weakly referenced
        gets its own each time)."""
        try:
            texts = _TEXTS.get(tokenizer)
            if texts is None:
                texts = _TEXTS[tokenizer] = cls(tokenizer)
        except TypeError:
            return cls(tokenizer)
        return texts

    def decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return str(self.backend.decode(ids, skip_special_tokens=False))
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def lead(self, token_id: int) -> str:
        """The token's text alone; empty for a byte-fallback piece ("<0x74>"), which is decoded together with
        the byte pieces next to it (an invalid run becomes one U+FFFD per byte, even for ASCII bytes)."""
        lead = self.leads.get(token_id)
        if lead is None:
            lead = "" if _BYTE_PIECE.fullmatch(self._piece(token_id)) else self.decode([token_id])
            self.leads[token_id] = lead
        return lead

    def relative(self, anchor: int | None, ids: list[int]) -> str | None:
        """Text of ``ids`` as it reads after ``anchor``, or ``None`` when the anchor cannot tell (its own text
        does not begin the whole: it ends inside a character, or inside a run of byte-fallback bytes decoded
        together)."""
        if anchor is None:
            return self.decode(ids)
        lead = self.lead(anchor)
        whole = self.decode([anchor, *ids])
        # An anchor with no text alone (a SentencePiece "▁" or byte whose space is stripped at the start) says
        # nothing about where its text ends; one ending in U+FFFD ends inside a character.
        if not lead or lead.endswith(_REPLACEMENT) or not whole.startswith(lead):
            return None
        return whole[len(lead) :]

    def after_pair(self, neighbour: int, token_id: int) -> str | None:
        """The text ``token_id`` adds after ``neighbour`` (see :meth:`relative`), kept per pair -- or, with a
        decoder that reads each token on its own, per token."""
        pair = neighbour << 32 | token_id
        text = self.after.get(pair)
        if text is not None:
            return text
        plain = self.local and self._plain(neighbour) and self._plain(token_id)
        if plain:
            text = self.follows.get(token_id)
            if text is None:
                text = self.relative(neighbour, [token_id])
                if text is not None:
                    self.follows[token_id] = text
            if text is not None and neighbour not in self.follows:
                self.after_pair(token_id, neighbour)  # the neighbour's own text, once: later pairs need no decode
            return text
        text = self.relative(neighbour, [token_id])
        if text is not None and len(self.after) < _PAIRS:
            self.after[pair] = text
        return text

    def known(self, neighbour: int, token_id: int) -> str | None:
        """:meth:`after_pair` when it needs no decode (the pair, or the token after any plain neighbour, seen
        before), else ``None``."""
        follows = self.follows  # plain tokens only: a neighbour found there is plain
        if neighbour in follows:
            text = follows.get(token_id)
            if text is not None:
                return text
        return self.after.get(neighbour << 32 | token_id)

    def reads_alone(self, token_id: int) -> bool:
        """Whether the token (its text alone already read) adds the same text after every neighbour that also
        reads alone: the decoder reads tokens on their own and the token is plain."""
        return self.local and self._known_plain(token_id)

    def _known_plain(self, token_id: int) -> bool:
        lead = self.leads.get(token_id)
        return lead is not None and lead != "" and token_id not in self.added and _REPLACEMENT not in lead

    def _plain(self, token_id: int) -> bool:
        """Neither added (special) nor a byte-fallback piece, and its text alone is whole characters."""
        self.lead(token_id)  # read once if it never was
        return self._known_plain(token_id)

    def forget(self) -> None:
        """Drop the texts kept for pairs of tokens (they are learned again as text comes; for measurements)."""
        self.after.clear()
        self.follows.clear()

    def _piece(self, token_id: int) -> str:
        if self.backend is not None:
            return str(self.backend.id_to_token(token_id) or "")
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        return str(convert(token_id) or "") if callable(convert) else ""


_TEXTS: weakref.WeakKeyDictionary[Any, TokenTexts] = weakref.WeakKeyDictionary()

# Decoder steps after which a token that is not the first reads the same whatever came before it (given that
# neither it nor its neighbour is a byte-fallback piece, an added token, or bytes of an unfinished character):
# ByteLevel maps each token's bytes, Metaspace and ByteFallback work per token, Fuse joins, Strip at the start
# touches the first token only, Replace of one character cannot span two tokens.
_PER_TOKEN_STEPS = frozenset({"ByteLevel", "Metaspace", "ByteFallback", "Fuse"})


def _reads_tokens_alone(backend: Tokenizer | None) -> bool:
    """Whether ``backend``'s decoder reads each token on its own (see _PER_TOKEN_STEPS); ``False`` for any
    decoder not known to, and when the decode is not the backend's (transformers' clean-up of spaces)."""
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder")
    except (ValueError, TypeError, AttributeError):
        return False

    def alone(step: Any) -> bool:
        if not isinstance(step, dict):
            return False
        kind = step.get("type")
        if kind == "Sequence":
            return all(alone(inner) for inner in step.get("decoders") or [])
        if kind == "Replace":
            pattern = step.get("pattern") or {}
            return isinstance(pattern.get("String"), str) and len(pattern["String"]) == 1
        if kind == "Strip":
            return step.get("stop") == 0
        return kind in _PER_TOKEN_STEPS

    return decoder is not None and alone(decoder)


class TextStream:
    """The decoded text of one row, token by token, with the character count after every token.

    Token indices are the row's (``ids[i]``, prompt and padding included); the stream holds the tokens from
    :attr:`base` on and the text they produced, which starts at character :attr:`char_base` of the row's text
    (positions are absolute; only the last few hundred characters are kept).

    Args:
        tokenizer (`PreTrainedTokenizerBase` or `tokenizers.Tokenizer`): decodes the row's tokens.
        keep_chars (`int`): characters of text the stream must keep behind its end (the longest match and some
            slack); older text is dropped as the row grows, so memory and cost stay bounded.

    Example:

    ```python
    >>> from tokenizers import Tokenizer, decoders, models
    >>> vocab = {"<unk>": 0, "Once": 1, "Ġupon": 2, "ĠThe": 3, "ĠE": 4, "nd": 5}
    >>> tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    >>> tok.decoder = decoders.ByteLevel()
    >>> stream = TextStream(tok, keep_chars=64)
    >>> stream.reset([1, 2, 3], first=0)
    >>> stream.push(4); stream.push(5)
    >>> stream.text, stream.cut(stream.text.index("The"))   # " The" is token 2
    ('Once upon The End', 2)
    >>> stream.truncate(3)
    True
    >>> stream.text
    'Once upon The'

    ```
    """

    def __init__(self, tokenizer: Any, keep_chars: int) -> None:
        self.tokenizer = tokenizer
        self.keep_chars = keep_chars
        self._trim_at = 4 * keep_chars + 256  # text longer than this is trimmed (see _trim)
        # The tokens held: ids[base:base + len(tokens)] of the row, and the token before them (None at the
        # row's first token), which anchors the first token's text.
        self.base = 0
        self.anchor: int | None = None
        self.tokens: list[int] = []
        # ends[i]: characters of the row's text up to and including tokens[i]'s own (absolute); a token without
        # text of its own ends where the next token with some does. own[i]: whether it has text of its own.
        self.ends: list[int] = []
        self.own: list[bool] = []
        self.pending = 0  # trailing tokens whose character is not complete yet
        self.unfinished = ""  # what a decoder shows for them (U+FFFD), not part of the text while more may come
        # The text: characters char_base .. char_base + len(text) of the row's text.
        self.char_base = 0
        self.text = ""
        # Characters of the first token held when the stream began mid-row: no match may start there, as in
        # scan(), whose window's first token may read differently.
        self.head_end = 0
        # Where the last push or cut changed text that was there before (a rewrite), or None.
        self.changed_from: int | None = None
        # Plain tokens appended by :meth:`defer_plain` whose text is not in ``text``/``ends``/``own`` yet (the last
        # ``deferred`` of ``tokens``), and whether the last token is plain (see :meth:`defer_plain`).
        self.deferred = 0
        self.plain_tail = False
        texts = TokenTexts.of(tokenizer)
        self._texts = texts
        self._lead = texts.leads  # token id -> its text alone
        self._after = texts.after  # neighbour << 32 | token id -> the text the token adds
        self._follows = texts.follows  # plain token id -> the text it adds after any plain neighbour

    # -- state --------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """The row length the stream has seen (tokens)."""
        return self.base + len(self.tokens)

    @property
    def end(self) -> int:
        """Absolute position just after the text."""
        if self.deferred:
            self.catch_up()
        return self.char_base + len(self.text)

    def cut(self, char: int) -> int:
        """Row index of the first token whose text overlaps absolute character ``char`` or later."""
        if self.deferred:
            self.catch_up()
        return self.base + bisect_right(self.ends, char)

    def chars(self, tokens: int) -> int:
        """Absolute character position after the row's first ``tokens`` tokens (clamped to the stream)."""
        if self.deferred:
            self.catch_up()
        i = tokens - self.base
        if i <= 0:
            return self.char_base
        return self.ends[min(i, len(self.ends)) - 1]

    def plain_text(self, token_id: int) -> str | None:
        """The text of a plain token (see :meth:`defer_plain`), the same after any plain neighbour; ``None`` for
        any other token, or one not seen as plain yet."""
        return self._follows.get(token_id)

    def plain_from(self, index: int) -> bool:
        """Whether the row's tokens from ``index`` on are all plain ones (see :meth:`defer_plain`): their texts
        are their own, whatever came before them."""
        follows = self._follows
        return not self.pending and all(token in follows for token in self.tokens[index - self.base :])

    # -- changes ------------------------------------------------------------------------------------------
    def reset(self, ids: Sequence[int], first: int) -> None:
        """Start over from the row's tokens ``ids`` (``ids[first]`` is its first real token): decode enough
        of its tail to hold :attr:`keep_chars` characters."""
        n = len(ids)
        start = max(first, n - max(8, self.keep_chars // 2))
        while True:
            self.base = start
            self.anchor = int(ids[start - 1]) if start > first else None
            self.tokens, self.ends, self.own = [], [], []
            self.pending, self.unfinished = 0, ""
            self.deferred, self.plain_tail = 0, False
            self.char_base = 0
            self.text = ""
            for token_id in ids[start:n]:
                self.push(int(token_id))
            if start == first or len(self.text) >= self.keep_chars + 8:
                break
            start = max(first, start - max(8, n - start))  # too little text: double the tokens
        self.head_end = self.char_base if self.anchor is None else (self.ends[0] if self.ends else self.char_base)
        self.changed_from = None

    def push_plain(self, token_id: int) -> str | None:
        """Append the row's next token when it is a plain one, and return the text it added: the text so far
        whole, the token's text after the previous token known (cached) and complete -- what :meth:`push` would
        append without decoding. ``None``, with nothing changed, for any other token (then :meth:`push` it)."""
        if self.deferred:
            self.catch_up()
        tokens = self.tokens
        if self.pending or not tokens or not self._lead.get(token_id):
            return None
        previous, follows = tokens[-1], self._follows
        text = follows.get(token_id) if previous in follows else None  # a plain token after a plain one
        if text is not None:
            self.plain_tail = True
        else:
            text = self._after.get(previous << 32 | token_id)
            if text is None or text.endswith(_REPLACEMENT):
                return None
            self.plain_tail = token_id in follows
        self._append(token_id, text)
        return text

    def defer_plain(self, token_id: int) -> None:
        """Append the row's next token, a plain one (see :class:`TokenTexts`: whole characters, not added, not a
        byte-fallback piece) after a plain last token (:attr:`plain_tail`), with a decoder that reads tokens on
        their own: its text is what it adds after any plain neighbour, so it can be added later, when the text is
        next read (:meth:`catch_up`). A reader that needs only the token count (a step known to find nothing)
        then pays for no text."""
        self.tokens.append(token_id)
        self.deferred += 1

    def catch_up(self) -> None:
        """Add the text of the tokens :meth:`defer_plain` appended (every reader of the text calls this first)."""
        count = self.deferred
        if not count:
            return
        self.deferred = 0
        tokens = self.tokens
        late = tokens[len(tokens) - count :]
        del tokens[len(tokens) - count :]
        follows = self._follows
        for token_id in late:
            text = follows.get(token_id)  # kept since it was deferred, unless the texts were forgotten since
            if text is None or not tokens:
                self.push(token_id)
            else:
                self._append(token_id, text)
        self.plain_tail = self.pending == 0 and tokens[-1] in follows

    def _append(self, token_id: int, text: str) -> None:
        self.changed_from = None
        self.tokens.append(token_id)
        self.text += text
        self.ends.append(self.char_base + len(self.text))
        self.own.append(True)
        if len(self.text) > self._trim_at:
            self._trim()

    def push(self, token_id: int) -> None:
        """Append the row's next token."""
        if self.deferred:
            self.catch_up()
        self.plain_tail = False
        tokens = self.tokens
        if self.pending == 0 and tokens and (self._lead.get(token_id) or self._texts.lead(token_id)):
            # The usual token: the text so far is whole and neither this token nor the one before it is a
            # byte-fallback piece (the only pieces whose text depends on more than their left neighbour), so
            # the text grows by what this token adds after the previous one (one short decode).
            text = self._texts.known(tokens[-1], token_id) or self._texts.after_pair(tokens[-1], token_id)
            if text is not None and not text.endswith(_REPLACEMENT):
                self.plain_tail = token_id in self._follows
                self._append(token_id, text)
                return
        self.changed_from = None
        tokens.append(token_id)
        first = max(0, len(self.tokens) - max(_WINDOW, self.pending + 2))
        start = self.ends[first - 1] if first > 0 else self.char_base
        anchor = self.tokens[first - 1] if first > 0 else self.anchor
        text = self._texts.relative(anchor, self.tokens[first:])
        if self.pending == 0 and text is not None and not text.endswith(_REPLACEMENT):
            old = len(self.text) - (start - self.char_base)
            if text.startswith(self.text[start - self.char_base :]):  # the usual case: new text appended
                self.text += text[old:]
                self.ends.append(self.end)
                self.own.append(True)
                self._trim()
                return
        self.ends.append(self.end)
        self.own.append(False)
        self._redecode(first)
        self._trim()

    def truncate(self, length: int) -> bool:
        """Cut the row back to ``length`` tokens. Returns ``False`` when the stream no longer reaches back that
        far (then :meth:`reset` it from the row)."""
        if self.deferred:
            self.catch_up()
        if length == self.length:
            return True
        if length <= self.base or length > self.length:
            return False
        keep = length - self.base
        del self.tokens[keep:]
        del self.ends[keep:]
        del self.own[keep:]
        last_own = keep - 1
        while last_own >= 0 and not self.own[last_own]:
            last_own -= 1
        self.text = self.text[: (self.ends[last_own] if last_own >= 0 else self.char_base) - self.char_base]
        self.pending = 0
        # The kept tokens may read differently without the removed ones (bytes completed by a removed token).
        self._redecode(max(0, keep - _WINDOW - 1))
        self.plain_tail = self.pending == 0 and self.tokens[-1] in self._follows
        return True

    # -- internals ---------------------------------------------------------------------------------------
    def _redecode(self, first: int) -> None:
        """Work out tokens[first:]'s text and ends from prefix decodes, as a decode of the whole row sees them:
        a token whose prefix text is a prefix of the window's text ends there; one that is not (bytes of a
        character that later tokens complete) ends with the next one that is; trailing U+FFFD is an
        unfinished character, whose tokens are pending."""
        # An anchor whose text the window changes (bytes of one character, or one run of byte-fallback bytes
        # decoded together) cannot anchor: move the window's start back.
        while first > 0 and self._texts.relative(self.tokens[first - 1], self.tokens[first:]) is None:
            first -= 1
        anchor = self.tokens[first - 1] if first > 0 else self.anchor
        window = self.tokens[first:]
        start = self.ends[first - 1] if first > 0 else self.char_base
        whole = self._texts.relative(anchor, window)
        if whole is None:  # the stream's own anchor ends inside a character: read the window without it
            anchor, whole = None, self._texts.decode(window)
        body = whole.rstrip(_REPLACEMENT)
        ends: list[int | None] = []
        for j in range(1, len(window) + 1):
            prefix = self._texts.relative(anchor, window[:j]) if anchor is not None else self._texts.decode(window[:j])
            own = prefix is not None and len(prefix) <= len(body) and body.startswith(prefix)
            ends.append(start + len(prefix) if own and prefix is not None else None)
        own_flags = [end is not None for end in ends]
        pending = 0
        while pending < len(window) and not own_flags[len(window) - 1 - pending]:
            pending += 1
        following = start + len(body)
        resolved: list[int] = [0] * len(window)
        for j in range(len(window) - 1, -1, -1):  # a token without text of its own ends with the next one
            end = ends[j]
            if end is not None:
                following = end
            resolved[j] = following
        old = self.text[start - self.char_base :]
        if not body.startswith(old):
            same = 0
            while same < min(len(old), len(body)) and old[same] == body[same]:
                same += 1
            self.changed_from = start + same
        self.text = self.text[: start - self.char_base] + body
        self.ends[first:] = resolved
        self.own[first:] = own_flags
        self.pending = pending
        self.unfinished = whole[len(body) :] if pending else ""

    def finish(self) -> None:
        """The row ends here: the bytes of an unfinished character become text as a decode of the whole row shows
        them (U+FFFD), ending with the last token."""
        if self.deferred:
            self.catch_up()
        if not self.pending:
            return
        self.text += self.unfinished
        self.ends[len(self.ends) - self.pending :] = [self.end] * self.pending
        self.pending = 0
        self.unfinished = ""
        self.changed_from = None

    def _trim(self) -> None:
        """Drop text and tokens far behind the end (keep twice what a match can need)."""
        if len(self.text) <= self._trim_at or len(self.tokens) <= 64:
            return
        drop = bisect_right(self.ends, self.end - 2 * self.keep_chars - 64)
        drop = min(drop, len(self.tokens) - 32)
        if drop <= 0:
            return
        new_char_base = self.ends[drop - 1]
        self.text = self.text[new_char_base - self.char_base :]
        self.char_base = new_char_base
        self.anchor = self.tokens[drop - 1]
        self.base += drop
        del self.tokens[:drop]
        del self.ends[:drop]
        del self.own[:drop]
        self.head_end = max(self.head_end, self.char_base)
