"""Incremental detokenization of one row: its text grows by the new token's text, and shrinks with a rewind.

Decoding a row's tail again after every token costs a tokenizer call over dozens of tokens plus the prefix
decodes that map characters back to tokens. :class:`TextStream` instead decodes each new token once, in the
context of a few tokens before it (a SentencePiece piece's leading space, a byte-level piece that completes a
UTF-8 character), and records after every token how many characters the row's text has. That record is the
map from characters back to tokens, and it is also the snapshot a rewind restores: cutting the row back to
``n`` tokens cuts the text back to the characters those ``n`` tokens produced.

Tokens whose bytes do not yet form a whole character (byte-fallback ``<0xE2>``, half a byte-level emoji)
produce no text until a later token completes the character; they are *pending*, and the completed
character counts as theirs (the first token whose text overlaps it is the first pending one).

The decoding itself is ``tokenizers``' :class:`~tokenizers.decoders.DecodeStream` when the tokenizer has a
Rust backend whose output ``tokenizer.decode`` does not post-process (about 2 µs a token), and otherwise the
same prefix/read-offset scheme with ``tokenizer.decode`` calls (vLLM's detokenizer does it this way too).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

__all__ = ["TextStream"]

_REPLACEMENT = "\ufffd"  # what decoders show for an incomplete UTF-8 sequence
_CONTEXT_TOKENS = 6  # tokens decoded before a new one, so that its text is decoded as in the whole row


def _rust_backend(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` whose decode equals ``tokenizer.decode(ids, skip_special_tokens=False)``."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # transformers cleans up tokenization spaces (" ." -> ".") after the backend when asked to.
    if isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend
    return None


class _Decoder:
    """Turns one token at a time into text: the new characters, or ``None`` while a character is unfinished."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = _rust_backend(tokenizer)
        self.stream: DecodeStream | None = None
        # The prefix/read-offset fallback: ids since `prefix`, and the text of ids[prefix:read].
        self.ids: list[int] = []
        self.read = 0
        self.prefix_text = ""

    def restart(self, context: Sequence[int]) -> None:
        """Forget everything; the next token follows ``context`` (whose text is not produced again)."""
        if self.backend is not None:
            self.stream = DecodeStream(ids=list(context) or None, skip_special_tokens=False)
            return
        self.ids = list(context)
        self.read = len(self.ids)
        self.prefix_text = self._decode(self.ids)

    def step(self, token_id: int) -> str | None:
        if self.stream is not None and self.backend is not None:
            piece: str | None = self.stream.step(self.backend, token_id)
            return piece
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if len(text) <= len(self.prefix_text) or text.endswith(_REPLACEMENT):
            return None  # no new character yet (an unfinished one, or a token that is still being merged)
        new = text[len(self.prefix_text) :]
        # Keep a few tokens of context only, so that a step costs the same at token 10 and at token 10,000.
        drop = max(0, len(self.ids) - _CONTEXT_TOKENS)
        self.ids = self.ids[drop:]
        self.read = len(self.ids)
        self.prefix_text = self._decode(self.ids) if drop else text
        return new

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))


class TextStream:
    """The decoded text of one row, token by token, with the character count after every token.

    Token indices are the row's (``ids[i]``, prompt and padding included); the stream holds the tokens from
    :attr:`base` on and the text they produced, which starts at character :attr:`char_base` of an imaginary
    whole-row text (only differences of character positions are meaningful).

    Args:
        tokenizer (`PreTrainedTokenizerBase` or `tokenizers.Tokenizer`): decodes the row's tokens.
        keep_chars (`int`): characters of text the stream must keep behind its end (the longest match and some
            slack); older text is dropped as the row grows, so memory stays bounded.

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
        self.decoder = _Decoder(tokenizer)
        self.keep_chars = keep_chars
        # The tokens held: ids[base:base + len(tokens)] of the row.
        self.base = 0
        self.tokens: list[int] = []
        # ends[i]: characters of text once tokens[:i + 1] are decoded (pending tokens: the end of the character
        # they are part of, once it is complete). Absolute, like char_base.
        self.ends: list[int] = []
        self.emitted: list[bool] = []  # whether the decoder gave text when the token came
        self.pending = 0  # trailing tokens whose character is not complete yet
        # The text: characters char_base .. char_base + len(text).
        self.char_base = 0
        self.text = ""
        # The first token may decode differently without its left neighbour (a dropped leading space): its
        # characters are no place to start a match, unless it is the row's first token.
        self.head_end = 0

    # -- state --------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """The row length the stream has seen (tokens)."""
        return self.base + len(self.tokens)

    @property
    def end(self) -> int:
        """Absolute position just after the text."""
        return self.char_base + len(self.text)

    def reset(self, ids: Sequence[int], first: int) -> None:
        """Start over from the row's tokens ``ids`` (``ids[first]`` is its first real token): decode enough
        of its tail to hold :attr:`keep_chars` characters."""
        n = len(ids)
        start = max(first, n - max(8, self.keep_chars // 2))
        while True:
            context = list(ids[max(first, start - _CONTEXT_TOKENS) : start])
            self._restart(start, context)
            for token_id in ids[start:n]:
                self.push(int(token_id))
            if start == first or len(self.text) >= self.keep_chars + 8:
                break
            start = max(first, start - max(8, n - start))  # too little text: double the tokens
        self.head_end = self.char_base if start == first else (self.ends[0] if self.ends else self.char_base)

    def _restart(self, start: int, context: list[int]) -> None:
        self.decoder.restart(context)
        self.base = start
        self.tokens = []
        self.ends = []
        self.emitted = []
        self.pending = 0
        self.char_base = 0
        self.text = ""

    def push(self, token_id: int) -> None:
        """Append the row's next token."""
        piece = self.decoder.step(token_id)
        self.tokens.append(token_id)
        self.emitted.append(piece is not None)
        if piece is None:
            self.pending += 1
            self.ends.append(self.end)
            return
        self.text += piece
        end = self.end
        if self.pending:  # the completed character belongs to the tokens that began it
            self.ends[len(self.ends) - self.pending :] = [end] * self.pending
            self.pending = 0
        self.ends.append(end)
        if len(self.text) > 4 * self.keep_chars + 256 and len(self.tokens) > 64:
            self._trim()

    def _trim(self) -> None:
        """Drop text and tokens far behind the end (keep twice what a match can need)."""
        keep_from = self.end - 2 * self.keep_chars - 64
        drop = bisect_right(self.ends, keep_from)
        drop = min(drop, len(self.tokens) - 32)
        if drop <= 0:
            return
        new_char_base = self.ends[drop - 1]
        self.text = self.text[new_char_base - self.char_base :]
        self.char_base = new_char_base
        self.base += drop
        del self.tokens[:drop]
        del self.ends[:drop]
        del self.emitted[:drop]
        self.head_end = max(self.head_end, self.char_base)

    def truncate(self, length: int) -> bool:
        """Cut the row back to ``length`` tokens. Returns ``False`` when the stream no longer reaches back that
        far (then :meth:`reset` it from the row)."""
        if length == self.length:
            return True
        if length <= self.base or length > self.length:
            return False
        keep = length - self.base
        del self.tokens[keep:]
        del self.ends[keep:]
        del self.emitted[keep:]
        # Kept tokens whose character a removed token completed are pending again.
        pending = 0
        while pending < keep and not self.emitted[keep - 1 - pending]:
            pending += 1
        text_end = self.ends[keep - 1 - pending] if pending < keep else self.char_base
        self.ends[keep - pending :] = [text_end] * pending
        self.text = self.text[: text_end - self.char_base]
        self.pending = pending
        self.decoder.restart(self.tokens[max(0, keep - pending - _CONTEXT_TOKENS) : keep - pending])
        for token_id in self.tokens[keep - pending :]:
            self.decoder.step(token_id)  # an unfinished character again: no text
        return True

    def cut(self, char: int) -> int:
        """Row index of the first token whose text overlaps absolute character ``char`` or later."""
        return self.base + bisect_right(self.ends, char)

    def chars(self, tokens: int) -> int:
        """Absolute character position after the row's first ``tokens`` tokens (clamped to the stream)."""
        i = tokens - self.base
        if i <= 0:
            return self.char_base
        return self.ends[min(i, len(self.ends)) - 1]
