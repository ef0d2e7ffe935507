"""The length mode and the landing: a row writes at least a minimum, then ends at a natural boundary.

* :class:`Landing` -- the settings: from ``margin`` tokens before ``max_new_tokens`` (and, in the length mode,
  from the minimum on) EOS is raised right after a sentence or line end, more and more; a row that still
  reaches the limit is cut back to its last complete sentence (:func:`~perpetual_logits.text.boundaries.cut_point`).
* :class:`RowText` -- per row, what the text says: whether it ends at a sentence end now, where its last
  boundary is, whether its minimum (tokens, words) is reached. A :class:`~perpetual_logits.RowState`.
* :class:`LandingBias` -- the logits processor that raises EOS at sentence ends.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

from .. import _validation
from ..protocol import RowState, RowView
from ..text.boundaries import _CLOSERS, _ENDERS, _decode, _sentence_end_inside, count_words
from ..text.text_stream import TokenTexts, rust_backend

__all__ = ["Landing", "LandingBias", "RowText"]

_MAX_PIECES = 1 << 16
_ALONE = 1 << 62  # the key bit of a token's text alone (pair keys stay below it)
_ANY_END = frozenset(".!?…。！？")  # a piece without these holds no sentence end (no regex needed)

# How a row's text ends, as far as sentence ends go (the two low bits of a row's state after each token):
_OTHER = 0  # no sentence end
_PENDING = 1  # sentence punctuation (then closing quotes or brackets), not yet confirmed by whitespace
_ENDED = 2  # a sentence end confirmed by whitespace, or a line end (trailing spaces and tabs included)
# A row's state after each token, one int: how its text ends, whether its last character is an ASCII letter (the
# next piece may continue that word), and the words written (from bit 3 on).
_LAST_LETTER = 4
_WORDS_SHIFT = 3

# What a piece of text does to the end of the text it is appended to (see _piece_code), by kind: the class it
# leaves, whatever came before (kinds 0-2), or a function of the class before (kinds 3-5: pieces of spaces, tabs
# and closing quotes or brackets only). _MARK: the text now ends at a sentence end, a cut may end here.
_TO_OTHER, _TO_PENDING, _TO_ENDED, _SPACES, _CLOSERS_ONLY, _CLOSERS_THEN_SPACES = range(6)
_MARK = 4
#: ``_NEXT[kind * 3 + class before]``: the class after, with _MARK.
_NEXT = (
    *(_OTHER, _OTHER, _OTHER),
    *(_PENDING, _PENDING, _PENDING),
    *(_ENDED | _MARK, _ENDED | _MARK, _ENDED | _MARK),
    *(_OTHER, _ENDED | _MARK, _ENDED | _MARK),  # spaces confirm punctuation, and extend an end
    *(_OTHER, _PENDING, _OTHER),  # closers extend punctuation; after a space or a line end they are text
    *(_OTHER, _ENDED | _MARK, _OTHER),  # closers then spaces: punctuation confirmed
)

# A piece's code, one int: its kind (bits 0-2), the flags below, its words (from bit 16 on). 0 is no code.
_LETTER_HEAD = 1 << 3  # it begins with an ASCII letter: it may continue the text's last word
_SPACE_HEAD = 1 << 4  # it begins with whitespace: it confirms punctuation before it
_END_INSIDE = 1 << 5  # it holds a sentence end followed by whitespace
_LETTER_TAIL = 1 << 6  # it ends with an ASCII letter
_KNOWN = 1 << 7  # set in every code
_EMPTY = 1 << 8  # no text (a special token skipped, bytes of an unfinished character): nothing changes
_PIECE_WORDS = 16
#: Per tokenizer: the text a token adds after its left neighbour (special tokens skipped) and its code, keyed
#: ``neighbour << 32 | token`` (a token alone: ``_ALONE | token``). Rows keep writing the same word pairs, so most
#: tokens need no decode; this runs per row per token.
_PAIR_FACTS: weakref.WeakKeyDictionary[Any, dict[int, tuple[str, int]]] = weakref.WeakKeyDictionary()
#: Per tokenizer whose tokens read alone (see TokenTexts.reads_alone): a token's code after any neighbour that
#: reads alone too (set once it was read after one, else 0), indexed by the token. A flat list of ints, not a dict
#: of tuples: it is read right after the model's forward, which has pushed scattered entries out of the core's
#: caches.
_FOLLOW_FACTS: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


# The code of a piece of text, per piece (most pairs of tokens add the same piece as others with that token).
_CODE_OF_PIECE: dict[str, int] = {}


def _piece_code(piece: str) -> int:
    """What ``piece`` says when appended to a text, whatever the text (see the flags above): its words, how it
    begins and ends, whether it holds a sentence end followed by whitespace, and its kind -- how the text ends
    after it. A piece with more than spaces, tabs and closers decides that alone (its kind is the class it
    leaves); the others leave a class that depends on the class before (see _NEXT)."""
    if not piece:
        return _KNOWN | _EMPTY
    stripped = piece.rstrip(" \t")
    head = stripped.rstrip(_CLOSERS)
    trailing = stripped != piece
    if head:
        if stripped.endswith("\n"):
            kind = _TO_ENDED
        elif head[-1] in _ENDERS:
            kind = _TO_ENDED if trailing else _TO_PENDING
        else:
            kind = _TO_OTHER
    elif not stripped:
        kind = _SPACES
    else:  # closers only (a space among them would be in the head)
        kind = _CLOSERS_THEN_SPACES if trailing else _CLOSERS_ONLY
    code = _KNOWN | kind | count_words(piece) << _PIECE_WORDS
    if piece[0].isascii() and piece[0].isalpha():
        code |= _LETTER_HEAD
    if piece[0].isspace():
        code |= _SPACE_HEAD
    if _ANY_END.intersection(piece) and _sentence_end_inside(piece) > 0:
        code |= _END_INSIDE
    if piece[-1].isascii() and piece[-1].isalpha():
        code |= _LETTER_TAIL
    return code


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that ``decode(..., skip_special_tokens=True)`` skips: the tokenizer's special tokens and its added
    tokens marked special."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or ()}
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(added, dict):
        ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    backend = rust_backend(tokenizer)
    if backend is not None:
        ids.update(int(i) for i, token in backend.get_added_tokens_decoder().items() if token.special)
    return frozenset(ids)


#: While its incremental count is short of ``min_words``, a row's words are counted on its whole decoded text
#: every this many tokens (the incremental count can miss a character split over byte-level tokens).
_RECOUNT_EVERY = 32


@dataclass(frozen=True)
class Landing:
    """How a row ends before ``max_new_tokens`` instead of being cut wherever the budget runs out.

    Args:
        margin (`int`, defaults to 64): tokens before the limit from which EOS is favoured right after a sentence
            or line end; the favour rises linearly over these tokens. It never covers more than the last quarter
            of a row's budget (``max_new_tokens=40`` lands over its last 10 tokens), so a short budget is not
            ended early. In the length mode the rise also starts where the row reaches its minimum (whichever
            comes first).
        strength (`float`, defaults to 8.0): logit added to EOS at a sentence end once the rise is complete
            (``strength * steps / margin`` before).
        cut_back (`bool`, defaults to `True`): a row that reaches the limit anyway is returned cut back to its
            last complete sentence or line (failing that, its last whole word), never below what was already
            streamed. Streaming holds the text after the last sentence end (up to ``2 * margin`` tokens), so
            nothing streamed is ever cut.

    Example:

    ```python
    >>> from perpetual_logits import Landing
    >>> Landing().margin, Landing(margin=16, strength=4.0).strength
    (64, 4.0)
    >>> Landing(margin=0)
    Traceback (most recent call last):
    ...
    ValueError: `margin` must be an int >= 1, got 0

    ```
    """

    margin: int = 64
    strength: float = 8.0
    cut_back: bool = True

    def __post_init__(self) -> None:
        _validation.positive_int(self.margin, "margin")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not self.strength >= 0:
            raise ValueError(f"`strength` must be a number >= 0, got {self.strength!r}")
        if not isinstance(self.cut_back, bool):
            raise ValueError(f"`cut_back` must be a bool, got {self.cut_back!r}")


class RowText(RowState):
    """What each row's decoded text says, kept up to date token by token (a few tokens decoded per step):
    whether it ends a sentence now, where its sentence and line ends are, whether its minimum is reached.
    Backend-neutral: it sees a row only through :class:`~perpetual_logits.protocol.RowView`\\ s.

    Args:
        tokenizer: decodes token ids (``None`` only with ``min_tokens`` alone and no landing).
        min_tokens: generated tokens a row must have before its own end is accepted (0: none).
        min_words: words (see :func:`~perpetual_logits.text.boundaries.count_words`) it must have (0: none).
        landing: the landing settings, or ``None``.
    """

    def __init__(self, tokenizer: Any, min_tokens: int, min_words: int, landing: Landing | None) -> None:
        if tokenizer is None and (landing is not None or min_words):
            raise ValueError(
                "the landing and `min_words` read the text: pass the tokenizer (generate(..., tokenizer=tokenizer) "
                "or make_perpetual(model, tokenizer=tokenizer))"
            )
        # -- settings
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens
        self.min_words = min_words
        self.landing = landing
        self.has_minimum = bool(min_tokens or min_words)
        # Tokens held back for the cut at most (0: no cut back, nothing held).
        self._held_at_most = 2 * landing.margin if landing is not None and landing.cut_back else 0
        # -- per row: prompt length, the most tokens it may hold, the end of its text after each generated
        #    token, whether that end is sentence punctuation not yet confirmed by a space, its sentence/line ends
        #    (lengths, ascending), where its minimum was reached
        self.prompt_lengths: list[int] = []
        self.limits: list[int | None] = []
        # per row, after each generated token: how the text ends, whether its last character is an ASCII letter
        # and the words written, in one int (see _PENDING, _ENDED, _LAST_LETTER, _WORDS_SHIFT)
        self.states: list[list[int]] = []
        self.land_from: list[int | None] = []  # per row: the limit minus its margin (None: no known limit)
        # The shortest row length at which any row may be due, when that is known before any row reaches its
        # minimum (no length mode: the earliest of land_from); None otherwise.
        self.earliest_due: int | None = None
        self.boundaries: list[list[int]] = []
        self.reached_at: list[int | None] = []
        # -- shared with every RowText of this tokenizer
        self._facts: dict[int, tuple[str, int]] = {}
        self._follow: list[int] = []
        if tokenizer is not None:
            with contextlib.suppress(TypeError):  # a tokenizer that cannot be weakly referenced keeps its own
                self._facts = _PAIR_FACTS.setdefault(tokenizer, {})
                self._follow = _FOLLOW_FACTS.setdefault(tokenizer, [])
        # The text a token adds after its neighbour, decoded once for every reader of the tokenizer (the phrase
        # rules' text streams read the same pairs); this text skips special tokens, theirs keeps them, so pairs
        # with a special token are decoded here.
        self._texts = TokenTexts.of(tokenizer) if tokenizer is not None else None
        self._special = _special_ids(tokenizer) if tokenizer is not None else frozenset()

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int) -> None:
        self.start_rows([prompt_length] * batch_size)

    def start_rows(self, prompt_lengths: Sequence[int], limits: Sequence[int | None] | None = None) -> None:
        """Start rows with these prompt lengths and, per row, the most tokens it may hold (prompt included)."""
        batch = len(prompt_lengths)
        self.prompt_lengths = list(prompt_lengths)
        self.limits = list(limits) if limits is not None else [None] * batch
        self.states = [[] for _ in range(batch)]
        self._limits_changed()
        self.boundaries = [[] for _ in range(batch)]
        self.reached_at = [None] * batch

    def set_limits(self, limits: Sequence[int | None]) -> None:
        """Per row, the most tokens it may hold (prompt included; ``None``: unknown, no landing)."""
        self.limits = list(limits)
        self._limits_changed()

    def _limits_changed(self) -> None:
        self.land_from = [None if limit is None else limit - self.margin(row) for row, limit in enumerate(self.limits)]
        known = [length for length in self.land_from if length is not None]
        self.earliest_due = None if self.has_minimum else min(known, default=None)

    def rewind(self, row: int, length: int) -> None:
        generated = max(0, length - self.prompt_lengths[row])
        del self.states[row][generated:]
        kept = self.boundaries[row]
        while kept and kept[-1] > length:
            kept.pop()
        # An end right at the cut holds without what follows only when the kept text ends with it confirmed (by a
        # space, or a line end); one that the removed token confirmed (a space after punctuation, an end inside
        # its text) is gone with it.
        states = self.states[row]
        if kept and kept[-1] == length and not (states and states[-1] & 3 == _ENDED):
            kept.pop()
        reached = self.reached_at[row]
        if reached is not None and reached > length:
            self.reached_at[row] = None

    # -- updates -------------------------------------------------------------------------------------------
    def observe(self, view: RowView) -> bool:
        """Read the row's newest token; returns whether the row has just reached its minimum."""
        row, ids = view.row, view.ids
        length = len(ids)
        states = self.states[row]
        state = states[-1] if states else 0
        if self.tokenizer is not None:
            # The usual token: it and its neighbour read alone (the neighbour's code is set: it read alone after
            # one, and is no special token).
            token = ids[length - 1]
            follow = self._follow
            code = 0
            if length - 1 > self.prompt_lengths[row] and token < len(follow):
                neighbour = ids[length - 2]
                if 0 <= neighbour < len(follow) and follow[neighbour]:
                    code = follow[token]
            if not code:
                code = self._code(ids, length - 1, self.prompt_lengths[row])
            if not code & _EMPTY:
                words = (state >> _WORDS_SHIFT) + (code >> _PIECE_WORDS)
                if code & _LETTER_HEAD and state & _LAST_LETTER:
                    words -= 1  # the piece continues the text's last run of letters: one word
                if (code & _SPACE_HEAD and state & 3 == _PENDING) or code & _END_INSIDE:
                    self._mark(row, length - 1)  # a cut may end before this token (and spell what it ends)
                after = _NEXT[(code & 7) * 3 + (state & 3)]
                if after & _MARK:
                    self._mark(row, length)
                state = words << _WORDS_SHIFT | (_LAST_LETTER if code & _LETTER_TAIL else 0) | after & 3
        states.append(state)
        if self.has_minimum and self.reached_at[row] is None and self._minimum_met(row, ids):
            self.reached_at[row] = length
            return True
        return False

    def _mark(self, row: int, length: int) -> None:
        kept = self.boundaries[row]
        if not kept or kept[-1] < length:
            kept.append(length)

    def _key(self, ids: Sequence[int], index: int, prompt: int) -> int:
        """The key of the text ``ids[index]`` adds (see _PAIR_FACTS): after its left neighbour among the generated
        tokens, special tokens skipped (they are not text), or alone."""
        token = int(ids[index])
        neighbour = -1
        for i in range(index - 1, prompt - 1, -1):
            if int(ids[i]) not in self._special:
                neighbour = int(ids[i])
                break
        return neighbour << 32 | token if neighbour >= 0 else _ALONE | token

    def _code(self, ids: Sequence[int], index: int, prompt: int) -> int:
        """The code of the text ``ids[index]`` adds, when the flat table does not know it."""
        key = self._key(ids, index, prompt)
        known = self._facts.get(key)
        return known[1] if known is not None else self._learn(key)[1]

    def pieces(self, ids: Sequence[int], prompt: int) -> list[str]:
        """The text each generated token of ``ids`` adds, as this reader reads it (their join is the row's text,
        special tokens skipped): what the per-token codes were worked out from."""
        return [self._learn(self._key(ids, i, prompt))[0] for i in range(prompt, len(ids))]

    def _minimum_met(self, row: int, ids: Sequence[int]) -> bool:
        generated = len(ids) - self.prompt_lengths[row]
        if generated < self.min_tokens or (self.min_tokens == 0 and self.min_words == 0):
            return False
        if self.min_words == 0:
            return True
        if 2 * generated < self.min_words:  # a word takes at least half a token: no need to count yet
            return False
        counted = self.words(row)
        if counted < self.min_words and generated % _RECOUNT_EVERY:
            return False
        # Reached by the incremental count (or time for a recount): confirm on the whole text, once.
        return count_words(_decode(self.tokenizer, ids[self.prompt_lengths[row] :])) >= self.min_words

    def _learn(self, key: int) -> tuple[str, int]:
        """The text of a pair key's token after its neighbour (or alone) and its code (kept per tokenizer)."""
        token = int(key & 0xFFFFFFFF)
        neighbour = int(key >> 32)
        shared = False  # the text came from the tokenizer's shared texts (no special token involved)
        if key & _ALONE:
            piece = _decode(self.tokenizer, [token])
        else:
            shared = self._texts is not None and neighbour not in self._special and token not in self._special
            found = self._texts.after_pair(neighbour, token) if shared and self._texts is not None else None
            if found is not None:
                piece = found
            else:
                shared = False
                before = (self._facts.get(_ALONE | neighbour) or self._learn(_ALONE | neighbour))[0]
                after = _decode(self.tokenizer, [neighbour, token])
                piece = after[len(before) :] if after.startswith(before) else after[-1:]
        code = _CODE_OF_PIECE.get(piece)
        if code is None:
            code = _piece_code(piece)
            if len(_CODE_OF_PIECE) < _MAX_PIECES:
                _CODE_OF_PIECE[piece] = code
        texts = self._texts
        if shared and texts is not None and texts.reads_alone(neighbour) and texts.reads_alone(token):
            follow = self._follow
            if token >= len(follow):
                follow.extend([0] * (token + 1 - len(follow)))
            follow[token] = code  # the same after any neighbour that reads alone
        elif len(self._facts) < _MAX_PIECES:
            self._facts[key] = (piece, code)
        return piece, code

    # -- queries -------------------------------------------------------------------------------------------
    def length(self, row: int) -> int:
        return self.prompt_lengths[row] + len(self.states[row])

    def words(self, row: int) -> int:
        """Words of the row's generated text, counted token by token."""
        states = self.states[row]
        return states[-1] >> _WORDS_SHIFT if states else 0

    def minimum_reached(self, row: int) -> bool:
        """The row has its minimum (the length mode is on and the row wrote enough)."""
        return self.reached_at[row] is not None

    def at_sentence_end(self, row: int) -> bool:
        """The text (special tokens skipped) ends with a sentence or line end now."""
        states = self.states[row]
        return bool(states) and states[-1] & 3 != _OTHER

    def margin(self, row: int) -> int:
        """The landing's margin for ``row``: at most the last quarter of its budget (0 without a known limit)."""
        limit = self.limits[row] if row < len(self.limits) else None
        if self.landing is None or limit is None:
            return 0
        return max(1, min(self.landing.margin, (limit - self.prompt_lengths[row]) // 4))

    def due(self, row: int) -> int | None:
        """The length from which EOS is favoured (and accepted) at sentence ends; ``None``: not (yet). In the
        length mode that is never before the minimum: the limit then cuts the row back instead."""
        if self.landing is None:
            return None
        reached = self.reached_at[row]
        land_from = self.land_from[row] if row < len(self.land_from) else None
        if self.min_tokens or self.min_words:  # the length mode: never before the minimum
            return None if reached is None else reached if land_from is None else min(reached, land_from)
        return land_from

    def accepts_end(self, row: int) -> bool:
        """Whether an EOS just sampled by ``row`` (observed) ends the row: its text ends a sentence (or line) and
        the row has its minimum or is landing. An EOS mid-sentence is a fragment, rewound as usual."""
        if not self.at_sentence_end(row):
            return False
        if self.minimum_reached(row):
            return True
        due = self.due(row)
        return due is not None and self.length(row) - 1 >= due

    def held(self, row: int) -> int:
        """Trailing tokens a streamer must hold so that a cut back to the last sentence end stays possible."""
        most = self._held_at_most
        if not most:
            return 0
        kept = self.boundaries[row]
        prompt = self.prompt_lengths[row]
        return min(prompt + len(self.states[row]) - (kept[-1] if kept else prompt), most)


class LandingBias(LogitsProcessor):
    """Raises EOS for rows whose text ends a sentence, from their due point on, rising over ``margin`` tokens.

    Args:
        text: the rows' :class:`RowText` (with a landing).
        eos: the EOS ids.
    """

    def __init__(self, text: RowText, eos: Sequence[int]) -> None:
        if text.landing is None:
            raise ValueError("LandingBias needs a RowText with a landing")
        self.text = text
        self.eos = list(eos)
        self.margin = text.landing.margin
        self.strength = float(text.landing.strength)
        # The EOS ids as an index, per device (built on first use there, not per step).
        self._eos_index: dict[torch.device, torch.Tensor] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        earliest = self.text.earliest_due
        if earliest is not None and input_ids.shape[-1] < earliest:
            return scores  # no row is due yet (every row is at most as long as the longest, the input's width)
        if not self.eos:
            return scores
        text = self.text
        amounts = [0.0] * scores.shape[0]  # per row: the logit added to its EOS ids
        boosted = False
        # Rows whose text ends a sentence now (few): only they can get the bonus.
        ending = [row for row, states in enumerate(text.states) if states and states[-1] & 3]
        for row in ending:
            length = text.length(row)
            due = text.due(row)
            if due is None or length < due:
                continue
            margin = text.margin(row) or self.margin
            amounts[row] = self.strength * min(1.0, (length - due + 1) / margin)
            boosted = True
        if not boosted:
            return scores
        # One tensor operation for every row and EOS id (indexing row by row costs more than the rest); a single
        # EOS id is one column.
        device = scores.device
        bonus = torch.tensor(amounts, dtype=scores.dtype, device=device)
        out = scores.clone()
        if len(self.eos) == 1:
            out[:, self.eos[0]] += bonus
        else:
            eos = self._eos_index.get(device)
            if eos is None:
                eos = self._eos_index[device] = torch.tensor(self.eos, device=device)
            out[:, eos] += bonus[:, None]
        return out  # type: ignore[return-value]
