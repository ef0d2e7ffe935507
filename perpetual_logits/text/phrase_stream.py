r"""Incremental phrase matching: per row, each new token costs the same however long the row and the phrase list.

:meth:`PhraseMatcher.scan <perpetual_logits.text.matcher.PhraseMatcher.scan>` decodes a row's tail and runs every
phrase's pattern over it, after every token: its cost grows with the number of phrases (and the chat set's
regular expressions make it about 0.45 ms a row). :class:`PhraseStream` gives the same answers (a newly
completed phrase, the tokens to hold back) from state it keeps per row:

* the row's text, grown by the new token's text only (:class:`~perpetual_logits.text.text_stream.TextStream`), with
  the character count after every token, which maps a match back to its first token and is what a rewind
  restores;
* one Aho-Corasick automaton for all string phrases (:class:`PhraseIndex`, shared by every row and call; one per
  case rule when some phrases ignore case and others do not), run over the last ``max_match_chars`` characters of
  the row's text after case folding and whitespace collapsing, so that its cost does not depend on the number of
  phrases. The word-boundary and confirmation rules of the module notes of :mod:`perpetual_logits.text.matcher`
  are checked on the few hits only. A regular expression that is only a list of whole words (the chat closings,
  see :mod:`~perpetual_logits.text.regex_words`) is matched as those words: it costs no regex search;
* for hold-back, where the trailing text that may still become a phrase begins. That position only moves
  forward while text is appended (a text that is no prefix of any phrase stays none with more text), so each
  new character is examined once: for strings, ``automaton.match`` tells whether the text from a candidate
  start is a prefix of some phrase; for a regular expression, a partial search resumes where the previous
  one stopped.

A rewind cuts the row's text back to the characters of the kept tokens and re-examines a bounded tail once.

The usual step finds nothing and holds nothing, before and after: a *quiet* step. Whether a step is quiet depends
only on the class of the character before the new text and the new text itself, so the answer is kept per
(class, text) and, for a plain token after a plain one, per (class, token) in a flat table
(:attr:`PhraseIndex.quiet_next`). Such a step reads only that table and appends the token, whose text the stream
adds when it is next read (:meth:`~perpetual_logits.text.text_stream.TextStream.defer_plain`): in a batched run
the step comes right after the model's forward, which has evicted the rows' text and the shared dictionaries
from the core's caches, and this step touches neither. A regular expression with a lookbehind over non-word
characters only (the chat set's "In conclusion" after a sentence end) is searched itself, not through its
prefilter, from a word character of the new text on, so the words that merely start like it ("into", "wanted
to") stay quiet steps.

Two more kinds of step are answered per token the same way. A word that may begin a phrase ("best" may begin "Best
regards", "happy" "Happy learning!") is held, and usually let go at the next token: a row whose text ends with held
plain tokens is in a *held state*, and where a plain token takes it is kept per held state and token
(:attr:`PhraseIndex.token_next`). A piece that may begin a regular expression whose lookbehinds read only non-word
characters ("in" may begin "In conclusion" after a sentence end) is quiet or not depending on those characters: its
answer is kept per *trail*, the characters after the text's last word character (:attr:`PhraseIndex.pair_quiet`).

Why pyahocorasick: on this project's 2-core CPU (smoke timings on a shared, loaded machine, so only their
order matters), for 10,000 random 2-3-word phrases pyahocorasick built in about 11 ms and scanned a
70-character tail in about 0.7 µs; ahocorasick-rs built as fast and scanned in about 0.4 µs; Hyperscan (block
mode) scanned in about 0.5 µs but took about 0.2 s to compile. All three are far below the rest of a step
(Python bookkeeping, one small decode). What decides is that pyahocorasick alone also answers "is this text a
prefix of some phrase?" (``Automaton.match``), which hold-back needs, and it ships wheels for every platform
we test. Hyperscan's streaming mode would keep the automaton state itself, but a rewind would need a copy of
every row's stream per token, and it does not do partial matches of regular expressions. Regular expressions
stay with the ``regex`` module (its partial matching), searched from where the previous step stopped, behind
one search of their alternation that usually finds nothing.
"""

from __future__ import annotations

import re
import weakref
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import ahocorasick
import regex

from .matcher import PhraseMatch, PhraseScan
from .regex_words import regex_words
from .text_stream import TextStream

if TYPE_CHECKING:
    from .matcher import PhraseMatcher

__all__ = ["PhraseIndex", "PhraseStream"]

_WORD = regex.compile(r"\w")
# Every whitespace character of the `regex` module's \s (the reference's), as a space: one character for one.
_SPACE_TABLE = {code: " " for code in range(0x3001) if regex.match(r"\s", chr(code))}
_ASCII_SPACES = "\t\n\x0b\x0c\r"
_RUNS = re.compile(" {2,}")


def _is_word(char: str) -> bool:
    return _WORD.match(char) is not None


_WORD_CHARS: dict[str, bool] = {}


def _word_char(char: str) -> bool:
    """``_is_word``, kept per character (asked once per row per token)."""
    known = _WORD_CHARS.get(char)
    if known is None:
        known = _WORD_CHARS[char] = _is_word(char)
    return known


def _spaces_as_one(raw: str) -> str:
    """``raw`` with each whitespace character replaced by a space (same length)."""
    if raw.isascii():
        if raw.isprintable():  # no control character: the only whitespace is the space itself
            return raw
        for char in _ASCII_SPACES:
            if char in raw:
                raw = raw.replace(char, " ")
        return raw
    return raw.translate(_SPACE_TABLE)


# The two characters that the `regex` module's case-insensitive matching equates with an ASCII letter where
# str.lower() does not: "İ" (lower case "i" and a combining dot, two characters) and the long "ſ".
_FOLD_TO_ASCII = {0x130: "i", 0x17F: "s"}


def _fold(text: str) -> str:
    """``text`` case folded as the ``regex`` module's case-insensitive matching compares it with phrases (one
    character for one)."""
    return text.lower() if text.isascii() else text.translate(_FOLD_TO_ASCII).lower()


class _Normalized:
    """A tail of the row's text as the automaton reads it: whitespace runs as one space, case folded when
    matching ignores case, and the way back to raw character offsets."""

    def __init__(self, raw: str, fold: bool) -> None:
        text = _spaces_as_one(raw)
        self.run_starts: list[int] = []  # normalized index of each collapsed run's space
        self.shifts: list[int] = []  # raw minus normalized index after that run
        if "  " in text:
            shift = 0
            for m in _RUNS.finditer(text):
                self.run_starts.append(m.start() - shift)
                shift += m.end() - m.start() - 1
                self.shifts.append(shift)
            text = _RUNS.sub(" ", text)
        self.text = _fold(text) if fold else text

    def raw(self, index: int) -> int:
        """Raw offset of the normalized character ``index`` (a collapsed run maps to its first character)."""
        if not self.shifts:
            return index
        k = bisect_right(self.run_starts, index - 1)  # runs whose space lies before `index`
        return index + (self.shifts[k - 1] if k else 0)


def _normalize(text: str, fold: bool) -> str:
    """``_Normalized(text, fold).text`` without the way back to raw offsets (what most calls need)."""
    text = _spaces_as_one(text)
    if "  " in text:
        text = _RUNS.sub(" ", text)
    return _fold(text) if fold else text


_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=|\\g<")
_SCOPABLE_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.ASCII | regex.V0 | regex.V1


_WORD_START = r"(?<!\w)"
_NOTHING = PhraseScan(None, 0)
# The answers of the steps that find nothing, per tokens held (immutable, so shared: a held word is common and a
# new answer per step would be built right after the model's forward).
_HELD = tuple(PhraseScan(None, tokens) for tokens in range(64))


def _holding(tokens: int) -> PhraseScan:
    """``PhraseScan(None, tokens)``."""
    return _HELD[tokens] if 0 <= tokens < len(_HELD) else PhraseScan(None, tokens)


_MEMO_ENTRIES = 1 << 16  # answers kept per phrase index (the first seen), so memory stays bounded
#: In :attr:`PhraseIndex.quiet_next`: the answer depends on the text's trail too (see PhraseIndex.pair_quiet).
_BY_PAIR = 255
#: A token whose text holds no word character has no trail of its own (see PhraseIndex.trail_of).
_NO_WORD = -2


def _gate(patterns: list[Any]) -> Any:
    """One pattern that matches (or partially matches) wherever any of ``patterns`` does: their alternation,
    each with its case flag scoped to its branch. One search of it tells that none of them has anything new,
    which is the usual step. ``None`` when the patterns' flags cannot be scoped (then each is searched)."""
    if len(patterns) < 2:
        return None
    branches: list[str] = []
    at_word_start: list[str] = []  # branches that begin with (?<!\w), written once before their group
    for pattern in patterns:
        source = pattern.pattern
        ignore_case = bool(pattern.flags & regex.IGNORECASE)
        if source.startswith("(?i)"):
            source, ignore_case = source[4:], True
        if pattern.flags & ~_SCOPABLE_FLAGS or _BACKREFERENCE.search(source):
            return None  # group numbers shift in an alternation; other flags would apply to every branch
        # The partial search tries every branch at every position: one shared lookbehind rejects a position
        # inside a word for all of them at once (partial searches take about a third less time on the chat set).
        shared = (
            source.startswith(_WORD_START)
            and not pattern.flags & (regex.V1 | regex.ASCII)
            and "(?V1" not in source
            and not _top_level_alternation(source)
        )
        if shared:
            source = source[len(_WORD_START) :]
        (at_word_start if shared else branches).append(f"(?i:{source})" if ignore_case else f"(?:{source})")
    if at_word_start:
        branches.append(_WORD_START + "(?:" + "|".join(at_word_start) + ")")
    try:
        return regex.compile("|".join(branches), regex.V0)
    except regex.error:
        return None


def _outside_sets(source: str, i: int = 0) -> Iterator[tuple[int, str, int]]:
    """Each character of the pattern ``source`` (version 0 syntax) from ``i`` on that stands outside every
    character set and escape: its index, itself, and the group depth before it (counted from ``i``)."""
    depth = 0
    while i < len(source):
        char = source[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            i = _set_end(source, i)
            continue
        yield i, char, depth
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        i += 1


def _top_level_alternation(source: str) -> bool:
    """Whether the pattern ``source`` (version 0 syntax) has a ``|`` outside every group and set, where a
    leading lookbehind would apply to one alternative only."""
    return any(char == "|" and depth == 0 for _, char, depth in _outside_sets(source))


# Constructs that read text before a match's start (besides lookbehinds, see _prefilter): a pattern holding any
# of them gets no prefilter. `\b` and friends look one character back; `^`, `\A`, `\G` depend on where the
# search starts; `\K` and conditionals are rare enough to leave to the full search.
_LOOKS_BACK = frozenset("bBAGKmMy")


def _without_lookbehinds(source: str) -> str | None:
    """``source`` (version 0 syntax) with every positive lookbehind group removed, or ``None`` when something
    else in it reads text before where a match starts (then no prefilter can be built from it)."""
    out: list[str] = []
    i = 0
    n = len(source)
    while i < n:
        char = source[i]
        if char == "\\":
            if source[i + 1 : i + 2] in _LOOKS_BACK:
                return None
            out.append(source[i : i + 2])
            i += 2
        elif char == "[":
            end = _set_end(source, i)
            out.append(source[i:end])
            i = end
        elif char == "^":
            return None
        elif source.startswith("(?<=", i):
            i = _group_end(source, i)
        elif source.startswith("(?(", i):
            return None
        else:
            out.append(char)
            i += 1
    return "".join(out)


# Escapes that stand for non-word characters only (inside a set or out): whitespace classes and the ASCII
# whitespace escapes; any other escaped punctuation stands for itself.
_NON_WORD_ESCAPES = frozenset("sWntrfv")
_QUANTIFIER = re.compile(r"\{\d*(?:,\d*)?\}")


def _escape_takes_no_word(escaped: str) -> bool:
    """Whether the escape ``"\\" + escaped`` stands for non-word characters only (a whitespace class or escaped
    punctuation)."""
    return escaped in _NON_WORD_ESCAPES or (escaped != "" and not escaped.isalnum() and not _is_word(escaped))


def _set_takes_no_word(source: str, i: int, end: int) -> bool:
    """Whether the character set ``source[i:end]`` (``source[i] == "["``) holds no word character: not negated,
    no range, only non-word characters and escapes of them."""
    j = i + 1
    if source.startswith("^", j):
        return False
    while j < end - 1:
        char = source[j]
        if char == "\\":
            if not _escape_takes_no_word(source[j + 1 : j + 2]):
                return False
            j += 2
            continue
        if _is_word(char) or (char == "-" and i + 1 < j < end - 2):
            return False
        j += 1
    return True


def _takes_no_word(body: str) -> bool:
    """Whether the pattern ``body`` (version 0 syntax, a lookbehind's inside) can only consume non-word
    characters: literals, sets and escapes of non-word characters, groups, alternations and quantifiers. Anything
    else (``.``, ``\\w``, anchors, lookarounds, flags) counts as possibly a word character."""
    i = 0
    n = len(body)
    while i < n:
        char = body[i]
        if char == "\\":
            if not _escape_takes_no_word(body[i + 1 : i + 2]):
                return False
            i += 2
        elif char == "[":
            end = _set_end(body, i)
            if not _set_takes_no_word(body, i, end):
                return False
            i = end
        elif char == "{":
            quantifier = _QUANTIFIER.match(body, i)
            i = quantifier.end() if quantifier else i + 1
        elif char == "(":
            if body.startswith("(?", i) and not body.startswith("(?:", i):
                return False
            i += 3 if body.startswith("(?:", i) else 1
        elif char in "|)*+?" or not (char in ".^$" or _is_word(char)):
            i += 1
        else:
            return False
    return True


def _lookbehinds_take_no_word(source: str) -> bool:
    """Whether every positive lookbehind of the pattern ``source`` can only consume non-word characters: then,
    right after a word character, none of them reads further back than the text after it (see
    :meth:`PhraseIndex.regex_candidates`)."""
    bodies = (
        source[i + 4 : _group_end(source, i) - 1] for i, _, _ in _outside_sets(source) if source.startswith("(?<=", i)
    )
    return all(_takes_no_word(body) for body in bodies)


def _set_end(source: str, i: int) -> int:
    """Index just after the character set that begins at ``source[i] == "["``."""
    i += 1
    if source.startswith("^", i):
        i += 1
    if source.startswith("]", i):  # a "]" first in a set is a literal
        i += 1
    while i < len(source) and source[i] != "]":
        i += 2 if source[i] == "\\" else 1
    return i + 1


def _group_end(source: str, i: int) -> int:
    """Index just after the group that begins at ``source[i] == "("``."""
    for j, char, depth in _outside_sets(source, i):
        if char == ")" and depth == 1:
            return j + 1
    return len(source)


def _prefilter(pattern: Any) -> Any:
    """A pattern that finds (or partially finds) something in a piece of text wherever ``pattern`` could begin a
    match or a partial match inside that piece, whatever text comes before the piece's one character of context
    (searched from position 1): ``pattern`` with its positive lookbehinds removed. A removed lookbehind only
    narrows where the pattern matches; a negative one is kept, as it reads the row's own text, or less of it (then
    it holds where it might not in the row). ``None`` when the pattern reads text before its start in another
    way."""
    source = pattern.pattern
    if pattern.flags & (regex.V1 | regex.ASCII) or _BACKREFERENCE.search(source):
        return None
    stripped = _without_lookbehinds(source)
    if stripped is None:
        return None
    body = stripped[4:] if stripped.startswith("(?i)") else stripped
    if "(?" in body.replace("(?:", "").replace("(?!", "").replace("(?=", "").replace("(?<!", ""):
        return None  # inline flags inside, named groups, other extensions: left to the full search
    try:
        return regex.compile(stripped, pattern.flags & ~regex.V0)
    except regex.error:
        return None


class _StringGroup:
    """The string phrases that are matched with the same case rule: their automaton and where they can begin.

    Args:
        fold: whether they ignore case (the text is then case folded too).
        keys: each phrase's text as the automaton reads it (see :class:`_Normalized`) -> (its length, whether it
            needs a word boundary before it, and after it, its phrase index).
    """

    def __init__(self, fold: bool, keys: dict[str, tuple[int, bool, bool, int]]) -> None:
        self.fold = fold
        automaton = ahocorasick.Automaton()
        for key, value in keys.items():
            automaton.add_word(key, value)
        automaton.make_automaton()
        self.automaton: Any = automaton
        # Where a phrase can begin: a character some phrase begins with, after a non-word character when the
        # phrase begins with a word character (case folded like the text).
        starts_word = {key[0] for key, (_, head, _, _) in keys.items() if head}
        starts_other = {key[0] for key, (_, head, _, _) in keys.items() if not head}
        parts = []
        if starts_word:
            parts.append(r"(?<!\w)[" + "".join(regex.escape(c) for c in sorted(starts_word)) + "]")
        if starts_other:
            parts.append("[" + "".join(regex.escape(c) for c in sorted(starts_other)) + "]")
        self.starts: Any = regex.compile("|".join(parts), regex.IGNORECASE if fold else 0)


class PhraseIndex:
    """What every row's :class:`PhraseStream` shares: the automata of the string phrases, the regular
    expressions, and the matcher's rules. Built once per :class:`~perpetual_logits.text.matcher.PhraseMatcher`
    (:meth:`of`), never copied (rules are deep-copied per ``generate()`` call; this stays shared).

    A regular expression that is only a list of whole words (:func:`~perpetual_logits.text.regex_words.regex_words`,
    as the chat closings are) is matched as those string phrases, each needing a word boundary on both sides.

    Args:
        matcher (`PhraseMatcher`): the phrases and their rules.
    """

    def __init__(self, matcher: PhraseMatcher) -> None:
        self.matcher = matcher
        self.need_chars: int = matcher.need_chars
        self.max_match_chars: int = matcher.max_match_chars
        # Per case rule (folded or not): key -> (length, head boundary, tail boundary, phrase index).
        keys: dict[bool, dict[str, tuple[int, bool, bool, int]]] = {}
        self.regexes: list[tuple[int, Any]] = []  # (phrase index, pattern)
        for index, item in enumerate(matcher.compiled):
            if item.literal:
                fold = not matcher.case_sensitive
                key = _normalize(item.source.strip(), fold)
                edges = (matcher.word_boundaries and _is_word(key[0]), matcher.word_boundaries and _is_word(key[-1]))
                words = [(key, *edges)]
            else:
                found = regex_words(item.pattern)
                if found is None or any(len(word) > self.max_match_chars for word in found[0]):
                    self.regexes.append((index, item.pattern))
                    continue
                fold = found[1]
                words = [(_normalize(word, fold), True, True) for word in found[0]]
            group = keys.setdefault(fold, {})
            for key, head, tail in words:
                if key not in group:  # the first listed phrase wins, as in scan()
                    group[key] = (len(key), head, tail, index)
        self.groups = [_StringGroup(fold, group) for fold, group in keys.items()]
        # The key of the string phrases' answers folds case only when every group does.
        self.fold = bool(self.groups) and all(group.fold for group in self.groups)
        self.gate = _gate([pattern for _, pattern in self.regexes])
        # The usual step of a row whose text holds nothing that may become a phrase, answered from what earlier
        # steps of any row found for the same text (both are pure functions of their key, see
        # PhraseStream._analyse): whether a new piece of text can begin a regular expression's match
        # (``prefilters``), and where the string phrases' hold moves after a piece.
        prefilters = [_prefilter(pattern) for _, pattern in self.regexes]
        self.prefilters: list[Any] | None = prefilters if self.regexes and None not in prefilters else None
        # One search of them all first: most new pieces begin none of them.
        self.prefilter_gate = _gate(prefilters) if self.prefilters is not None else None
        # Regexes whose positive lookbehinds consume only non-word characters ("(?<=[.!?]\s*)"): from a word
        # character on, the regex itself tells whether it may begin in the new text (its prefilter, without the
        # lookbehind, would say it may begin in the middle of every word that starts like it).
        self.stops_at_words = [
            prefilter is not None and _lookbehinds_take_no_word(pattern.pattern)
            for prefilter, (_, pattern) in zip(prefilters, self.regexes)
        ]
        self.candidates: dict[str, tuple[int, ...]] = {}  # piece -> the regexes that may begin inside it
        self.string_holds: dict[str, int] = {}
        # The quiet step -- nothing held before it, nothing held after it, no regex may begin in the new text --
        # keyed by the character before the new text (see before_key) and the new text: the key of the new end,
        # or -1 when quiet_after found that the step may not be quiet (the analysis then tells).
        self.quiet: dict[tuple[int, str], int] = {}
        # The same answers per token, for a plain token after a plain one (its text is then the token's own, see
        # TokenTexts): ``quiet_next[token << 1 | before]`` is 1 + the key after, 0 when not known. Kept only when
        # the keys are the character classes (0 or 1). A flat table, not a dict: the step that asks it runs
        # right after the model's forward, which has pushed the dicts' entries out of the core's caches.
        self.quiet_next = bytearray()
        # The steps that hold or let go a word that may begin a string phrase, per token, the same way. A row whose
        # text ends with held plain tokens (after a plain one), no regex holding text, is in a *held state*: the
        # class of the character before the hold, where the hold begins in its first token and the tokens, numbered
        # from 2 on (0 and 1 are the quiet steps' classes; numbers are never reused). ``token_next[state << 32 |
        # token]``, for a plain token, packs the state after it (a class: nothing held, quiet again) << 16, the
        # tokens then held << 8 and where the hold begins in the first of them; kept when a step worked it out from
        # the held text and the token alone (see PhraseStream._learn_step). The common words that may begin a
        # phrase ("to", "is", "I", "let", "best" for the chat set) are then held and let go like quiet steps.
        self.held_states: dict[tuple[int, int, tuple[int, ...]], int] = {}
        self.token_next: dict[int, int] = {}
        self._next_held = 2
        # A piece that may begin a regex whose lookbehinds read only non-word characters ("in" may begin "In
        # conclusion" after a sentence end): whether its step is quiet depends on the non-word characters before
        # it -- the text's *trail*, what follows its last word character (in the last few plain tokens). Its
        # quiet_next entry is then _BY_PAIR, and ``pair_quiet[trail << 32 | token]`` the key after, once a step
        # found it. Trails are numbered (``trails``, ``trail_texts``); a token with a word character has its own
        # (``token_trail``; _NO_WORD for one without). Both are bounded like the other answers kept.
        self.pair_quiet: dict[int, int] = {}
        self.trails: dict[str, int] = {}
        self.trail_texts: list[str] = []
        self.token_trail: dict[int, int] = {}
        # Keys stand for all the texts with the same answer: the character before the text by its class when only
        # `(?<!\w)` reads it, and ASCII text case folded when matching ignores case.
        kept = [p.pattern for p in self.prefilters] if self.prefilters is not None else []
        self.regex_head_by_class = all(source.count("(?<!") == source.count("(?<!\\w)") for source in kept)
        self.regex_fold = bool(kept) and all(p.flags & regex.IGNORECASE for p in self.prefilters or [])
        self.before_by_class = self.regex_head_by_class or not self.regexes

    def learn_quiet(self, token: int, before: int, after: int) -> None:
        """Keep the quiet step's answer for ``token``, a plain token after a plain one (see :attr:`quiet_next`)."""
        if not self.before_by_class:
            return
        at = token << 1 | before
        table = self.quiet_next
        if at >= len(table):
            table.extend(bytes(max(at + 1, 2 * len(table), 1024) - len(table)))
        table[at] = after + 1

    def learn_pair_quiet(self, token: int, before: int, trail: int, after: int) -> None:
        """Keep the quiet step's answer for the plain ``token`` after a text whose trail is ``trail`` (``before``:
        the key of its last character) when it depends on the trail (see :attr:`pair_quiet`)."""
        if not self.before_by_class or len(self.pair_quiet) >= _MEMO_ENTRIES:
            return
        at = token << 1 | before
        table = self.quiet_next
        if at >= len(table):
            table.extend(bytes(max(at + 1, 2 * len(table), 1024) - len(table)))
        table[at] = _BY_PAIR
        self.pair_quiet[trail << 32 | token] = after

    def trail_of(self, token: int, text: str) -> int:
        """The number of the trail of the plain ``token`` whose text is ``text`` (the characters after its last
        word character), kept per token; :data:`_NO_WORD` when the text holds no word character, -1 when no more
        trails are kept."""
        known = self.token_trail.get(token)
        if known is not None:
            return known
        end = len(text)
        while end and not _word_char(text[end - 1]):
            end -= 1
        trail = self.trail_number(text[end:]) if end else _NO_WORD
        if trail != -1 and len(self.token_trail) < _MEMO_ENTRIES:
            self.token_trail[token] = trail
        return trail

    def trail_number(self, trail: str) -> int:
        """The number of ``trail``, or -1 when no more trails are kept (memory stays bounded)."""
        number = self.trails.get(trail)
        if number is None:
            if len(self.trail_texts) >= _MEMO_ENTRIES:
                return -1
            number = len(self.trail_texts)
            self.trails[trail] = number
            self.trail_texts.append(trail)
        return number

    def held_state(self, before: int, offset: int, tokens: tuple[int, ...]) -> int:
        """The number of the held state (see :attr:`token_next`), or -1 when no more are kept."""
        key = (before, offset, tokens)
        state = self.held_states.get(key)
        if state is None:
            if len(self.held_states) >= _MEMO_ENTRIES:
                return -1
            state = self._next_held
            self._next_held += 1
            self.held_states[key] = state
        return state

    def before_key(self, char: str) -> int:
        """The character before new text as :meth:`string_key` and :meth:`piece_key` read it: whether it is a word
        character, or the character itself when a regex's lookbehind reads more of it."""
        return int(_word_char(char)) if self.before_by_class else ord(char) + 2

    def string_key(self, text: str) -> str:
        """The key of the string phrases' answer for ``text``: the character before the held text (only whether it
        is a word character matters to where a phrase may begin), the held text and the new piece."""
        key = ("a" if _word_char(text[0]) else " ") + text[1:]
        return key.lower() if self.fold and key.isascii() else key

    def piece_key(self, text: str) -> str:
        """The key of which regexes may begin in ``text[1:]`` (``text[0]``: the character before it)."""
        key = (("a" if _word_char(text[0]) else " ") + text[1:]) if self.regex_head_by_class else text
        return key.lower() if self.regex_fold and key.isascii() else key

    def regex_candidates(self, piece: str) -> tuple[int, ...]:
        """The regexes that may match, or partially match, text that begins inside ``piece[1:]`` (``piece[0]``:
        the character before it, which the negative lookbehinds read); kept per piece."""
        assert self.prefilters is not None
        found = []
        # A regex whose lookbehinds consume only non-word characters reads, at a start after a word character of
        # the piece (the first one may be the character before, which the key keeps by its class), nothing before
        # that word character: from there the regex itself is searched; before it, its prefilter.
        word = _WORD.search(piece) if self.regex_head_by_class else None
        exact_from = word.start() + 1 if word is not None else len(piece) + 1
        m = self.prefilter_gate.search(piece, 1, partial=True) if self.prefilter_gate is not None else None
        if self.prefilter_gate is None or (m is not None and not m.start() == m.end() == len(piece)):
            for r, prefilter in enumerate(self.prefilters):
                m = prefilter.search(piece, 1, partial=True)
                if m is not None and m.start() >= exact_from and self.stops_at_words[r]:
                    m = self.regexes[r][1].search(piece, exact_from, partial=True)
                if m is not None and not m.start() == m.end() == len(piece):
                    found.append(r)
        candidates = tuple(found)
        if len(self.candidates) < _MEMO_ENTRIES:
            self.candidates[self.piece_key(piece)] = candidates
        return candidates

    def quiet_after(self, text: str) -> int | None:
        """Whether adding ``text[1:]`` to a text that holds nothing, after the character ``text[0]``, is a quiet
        step -- it completes no string phrase, begins none, and begins no regular expression -- and then the key
        of the new end (:meth:`before_key`); ``None`` when it may not be (then the general analysis tells).

        The answer the general analysis gives for such a step, worked out alone: the first time a piece of text
        comes after a character class it costs a few automaton and regex calls instead of the whole analysis,
        and it is kept as the quiet step's answer from then on."""
        piece = text[1:]
        for group in self.groups:
            automaton = group.automaton
            if next(automaton.iter(_normalize(piece, group.fold)), None) is not None:
                return None  # a phrase inside the piece (whether it completes here is the analysis' call)
            for m in group.starts.finditer(text, 1):
                if automaton.match(_normalize(text[m.start() :], group.fold)):
                    return None  # the beginning of a phrase: held
        if self.regexes:
            if self.prefilters is None:
                return None
            candidates = self.candidates.get(self.piece_key(text))
            if candidates is None:
                candidates = self.regex_candidates(text)
            if candidates:
                return None  # a regex may begin here: its search reads the text before (no quiet step to keep)
        return self.before_key(text[-1])

    def learn_quiet_step(self, before: int, text: str) -> int:
        """:meth:`quiet_after` for ``text`` (``before``: the key of ``text[0]``), kept in :attr:`quiet`: the key of
        the new end, or -1 when the step may not be quiet."""
        after = self.quiet_after(text)
        answer = -1 if after is None else after
        if len(self.quiet) < _MEMO_ENTRIES:
            self.quiet[(before, text[1:])] = answer
        return answer

    @classmethod
    def of(cls, matcher: PhraseMatcher) -> PhraseIndex:
        """The index of ``matcher``, built on first use and kept on it."""
        index = _INDEXES.get(matcher)
        if index is None:
            index = cls(matcher)
            _INDEXES[matcher] = index
        return index

    def forget(self) -> None:
        """Drop the answers kept for text seen so far (they are rebuilt as text comes; for measurements)."""
        self.string_holds.clear()
        self.candidates.clear()
        self.quiet.clear()
        self.quiet_next.clear()
        self.held_states.clear()
        self.token_next.clear()
        self.pair_quiet.clear()
        self.trails.clear()
        self.trail_texts.clear()
        self.token_trail.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> PhraseIndex:
        return self  # immutable once built: every copy of a rule shares it

    def __copy__(self) -> PhraseIndex:
        return self


# Each matcher's index, built on first use and kept as long as the matcher lives.
_INDEXES: weakref.WeakKeyDictionary[PhraseMatcher, PhraseIndex] = weakref.WeakKeyDictionary()


class PhraseStream:
    """One row's incremental :meth:`PhraseMatcher.scan <perpetual_logits.text.matcher.PhraseMatcher.scan>`.

    Call :meth:`feed` after every new token of the row with the row's ids (it reads only what is new), and
    :meth:`rewind` when the row is cut back. A call that does not follow the previous one (ids that are not
    the previous ids plus one token, without a rewind in between) starts the row over from a bounded tail, so
    the answer is always that of a scan with ``new_tokens=1``.

    Args:
        matcher (`PhraseMatcher`): the phrases and their rules.

    Example:

    ```python
    >>> from tokenizers import Tokenizer, decoders, models
    >>> from perpetual_logits.text.matcher import PhraseMatcher
    >>> vocab = {"<unk>": 0, "Once": 1, "Ġupon": 2, "ĠThe": 3, "ĠE": 4, "nd": 5, ".": 6, "less": 7}
    >>> tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    >>> tok.decoder = decoders.ByteLevel()
    >>> stream = PhraseStream(PhraseMatcher(["The End"], tok))
    >>> [stream.feed([1, 2, 3, 4, 5][:n]).hold for n in range(1, 6)]   # " The E" ... "nd" may be "The End"
    [0, 0, 1, 2, 3]
    >>> stream.feed([1, 2, 3, 4, 5, 6]).match   # "... The End.": rewind to token 2 (" The")
    PhraseMatch(start=2, phrase='The End', text='The End')
    >>> stream.rewind(5)
    >>> stream.feed([1, 2, 3, 4, 5, 7])   # "... The Endless": an innocent word
    PhraseScan(match=None, hold=0)

    ```
    """

    __slots__ = (
        "_pure",
        "_regex_from",
        "_string_from",
        "first",
        "held",
        "held_offset",
        "held_tokens",
        "index",
        "quiet_before",
        "synced",
        "text",
    )

    def __init__(self, matcher: PhraseMatcher) -> None:
        self.index = PhraseIndex.of(matcher)
        self.text = TextStream(matcher.tokenizer, keep_chars=self.index.need_chars)
        # The row: its first real token; whether the stream holds the row's text (False: start over).
        self.first = 0
        self.synced = False
        # Hold-back: where text that may still become a phrase begins (absolute character positions; the
        # text's end when there is none), for the string phrases and for each regular expression.
        self._string_from = 0
        self._regex_from: list[int] = [0] * len(self.index.regexes)
        # Quiet: nothing is held at the text's end; the key of its last character (PhraseIndex.before_key), or -1.
        # While quiet, the hold positions above may lag behind the end (a quiet step does not move them: they are
        # brought up to where the quiet steps began when a step is not quiet).
        self.quiet_before = -1
        # Held (see PhraseIndex.token_next): the held state's number, or -1; the tokens held and where the hold
        # begins in the first of them. While held, the hold positions above are not kept: they are worked out
        # from these when a step is not answered from the table (_materialize).
        self.held = -1
        self.held_tokens = 0
        self.held_offset = 0
        # Whether the last _plain_step was answered from the held text and the token alone (see _learn_step).
        self._pure = False

    # -- public ------------------------------------------------------------------------------------------
    def rewind(self, length: int) -> None:
        """The row was cut back to ``length`` tokens (its own indices, prompt and padding included)."""
        if not self.synced or not self.text.truncate(length):
            self.synced = False
            self.held = -1
            return
        self._rescan_from(self.text.end - self.index.need_chars)

    def feed(self, ids: Sequence[int], prompt_length: int = 0, first: int = 0, final: bool = False) -> PhraseScan:
        """Look at the row after its newest token ``ids[-1]``.

        Args:
            ids (`Sequence[int]`): the row's tokens, prompt (and left padding) included.
            prompt_length (`int`, defaults to 0): how many of them are the prompt (padding included).
            first (`int`, defaults to 0): index of the row's first real token (after left padding).
            final (`bool`, defaults to `False`): no token will follow.

        Returns:
            `PhraseScan`: as :meth:`PhraseMatcher.scan` with ``new_tokens=1`` on ``ids[first:]``, in the row's
            own indices.
        """
        n = len(ids)
        stream = self.text
        if not (
            self.synced
            and self.first == first
            and stream.base + len(stream.tokens) == n - 1
            and (n < 2 or not stream.tokens or stream.tokens[-1] == ids[n - 2])
        ):
            self._start(ids, first)
        elif not final and n > prompt_length:
            token = int(ids[n - 1])
            before = self.quiet_before
            held = self.held
            if stream.plain_tail and (before >= 0 or held >= 0):  # a plain token after a plain one
                index = self.index
                if before >= 0:  # the quiet step, if known
                    at, table = token << 1 | before, index.quiet_next
                    after = table[at] if at < len(table) else 0
                    if after == _BY_PAIR:
                        trail = self._trail(len(stream.tokens) - 1)
                        after = index.pair_quiet.get(trail << 32 | token, -1) + 1 if trail >= 0 else 0
                    if after:
                        self.quiet_before = after - 1
                        stream.defer_plain(token)  # its text is read when the stream is next read
                        return _NOTHING
                    held = before
                step = index.token_next.get(held << 32 | token)  # a word held or let go, if known
                if step is not None:
                    stream.defer_plain(token)
                    state = step >> 16
                    if state < 2:
                        self.held = -1
                        self.quiet_before = state
                        return _NOTHING
                    self.quiet_before = -1
                    self.held = state
                    self.held_tokens = step >> 8 & 255
                    self.held_offset = step & 255
                    return _holding(min(self.held_tokens, n - prompt_length))
            stream.catch_up()
            self._materialize()
            was_plain = stream.plain_tail
            self._pure = False
            plain = self._plain_step(token, n, prompt_length)
            if plain is not None:
                if self.index.before_by_class:
                    self._note_step(held if self._pure and was_plain else -1, token)
                return plain
        else:  # the last token, or one of the prompt
            stream.catch_up()
            self._materialize()
        old_end = stream.char_base + len(stream.text)
        self._leave_quiet(old_end)
        stream.push(int(ids[n - 1]))
        if stream.changed_from is not None:  # the new token rewrote earlier text: look at the tail again
            old_end = min(old_end, stream.changed_from)
            self._rescan_from(stream.end - self.index.need_chars)
        if final:  # the last call: an unfinished character is text now (U+FFFD), which may confirm a match
            stream.finish()
        if n <= prompt_length:
            return _NOTHING
        return self._analyse(n, prompt_length, old_end, final)

    # -- internals ---------------------------------------------------------------------------------------
    def _plain_step(self, token: int, n: int, prompt_length: int) -> PhraseScan | None:
        """A step whose token adds its cached text after the previous one (``None`` otherwise, with nothing
        changed: the general path runs). The token is appended; what it completes and holds is then answered
        from what earlier steps of any row found for the same text (see :meth:`_analyse`) when that is known --
        no string phrase completed and the string hold known, no regex holding text, the regexes that may
        begin in the new text (usually none) found nothing -- and by the general analysis otherwise."""
        stream = self.text
        old_end = stream.char_base + len(stream.text)
        before = self.quiet_before
        was_plain = stream.plain_tail
        piece = stream.push_plain(token)
        index = self.index
        known: int | None = None
        by_pair = -1  # the quiet class before, when the answer is kept per trail
        trail = -1
        if before >= 0:
            known = index.quiet.get((before, piece)) if piece is not None else None
            if known is not None and known >= 0:  # the quiet step: nothing held before and after, nothing may begin
                return self._quiet_step(token, before, known, was_plain)
            self._leave_quiet(old_end)
        if piece is None:
            return None
        text, base = stream.text, stream.char_base
        end = base + len(text)
        if old_end <= base or end == old_end or stream.head_end > old_end:
            return self._analyse(n, prompt_length, old_end, False)
        if before >= 0 and known is None:
            # A piece not seen after this character class yet: whether the step is quiet is worked out alone
            # (-1: it may not be, the analysis below tells the rest).
            after = index.learn_quiet_step(before, text[old_end - base - 1 :])
            if after >= 0:
                return self._quiet_step(token, before, after, was_plain)
        # The string phrases: no phrase completed and where the hold moves, if known for this text.
        string_from = end
        if index.groups:
            key = self._held_key()
            moved = index.string_holds.get(key) if key is not None else None
            if moved is None and key is not None and before < 0 and self._releases(old_end):
                # The held word is let go and the new piece holds nothing (worked out alone): a quiet step.
                if len(index.string_holds) < _MEMO_ENTRIES:
                    index.string_holds[key] = -1
                self._regex_from = [end] * len(index.regexes)
                self._string_from = end
                self.quiet_before = index.before_key(text[-1])
                self._pure = True
                return _NOTHING
            if moved is None:
                return self._analyse(n, prompt_length, old_end, False)
            if moved >= 0:
                string_from = self._string_from + moved
        # The regular expressions: none holding text, and those that may begin in the new text find nothing.
        if index.regexes:
            candidates = (
                index.candidates.get(index.piece_key(text[old_end - base - 1 :]))
                if index.prefilters is not None
                else None
            )
            if candidates is None or min(self._regex_from) < old_end:
                return self._analyse(n, prompt_length, old_end, False)
            body = end - base
            for r in candidates:  # one search from the old end
                m = index.regexes[r][1].search(text, old_end - base, body, partial=True)
                if m is not None and not m.start() == m.end() == body:
                    return self._analyse(n, prompt_length, old_end, False)
            if candidates:
                # The searches read more than the new text: not a quiet step of this class. When they read only
                # non-word characters before it (the text's trail), the answer is kept per trail.
                if before >= 0 and was_plain and all(index.stops_at_words[r] for r in candidates):
                    trail = self._trail(len(stream.tokens) - 2)
                    by_pair = before if trail >= 0 else -1
                before = -1
            self._regex_from = [end] * len(index.regexes)
            self._pure = not candidates
        else:
            self._pure = True
        self._string_from = string_from
        if string_from >= end:
            after = index.before_key(text[-1])
            if by_pair >= 0 and stream.plain_tail:
                index.learn_pair_quiet(token, by_pair, trail, after)
            if before < 0 or len(index.quiet) >= _MEMO_ENTRIES:
                self.quiet_before = after
                return _NOTHING
            index.quiet[(before, piece)] = after
            return self._quiet_step(token, before, after, was_plain)
        return _holding(min(n - stream.cut(string_from), n - prompt_length))

    def _quiet_step(self, token: int, before: int, after: int, was_plain: bool) -> PhraseScan:
        """A quiet step from the character key ``before`` to ``after``: nothing held now. The answer is kept per
        token too when the token is a plain one after a plain one (``was_plain``: the tail before it was plain)."""
        self.quiet_before = after
        if was_plain and self.text.plain_tail:
            self.index.learn_quiet(token, before, after)
        return _NOTHING

    def _trail(self, last: int) -> int:
        """The number of the text's trail up to the stream's token ``last`` (an index into its tokens): the
        characters after the last word character, found in the last few plain tokens; -1 when they are not all
        plain or hold no word character. What a regex whose lookbehinds read only non-word characters reads before
        new text there."""
        index, stream = self.index, self.text
        tokens = stream.tokens
        trail = ""
        for i in range(last, max(last - 8, -1), -1):
            text = stream.plain_text(tokens[i])
            if text is None:
                return -1
            own = index.trail_of(tokens[i], text)
            if own == -1:
                return -1
            if own != _NO_WORD:
                return own if not trail else index.trail_number(index.trail_texts[own] + trail)
            trail = text + trail
        return -1

    def _materialize(self) -> None:
        """Leave a held state (the text caught up): the hold positions from the tokens held and where the hold
        begins in the first of them; no regex holds text."""
        if self.held < 0:
            return
        stream = self.text
        self.held = -1
        self._string_from = stream.chars(stream.length - self.held_tokens) + self.held_offset
        self._regex_from = [stream.char_base + len(stream.text)] * len(self.index.regexes)

    def _note_step(self, state: int, token: int) -> None:
        """After a plain step: enter the held state the row is now in, if it is one, and keep in
        :attr:`PhraseIndex.token_next` where the step went from ``state`` (a quiet class or a held state; -1: the
        step was not worked out from the held text and the token alone) -- to nothing held, or to a held state.
        (Quiet to quiet is kept in the quiet steps' table.)"""
        index = self.index
        if self.quiet_before >= 0:
            if state >= 2 and len(index.token_next) < _MEMO_ENTRIES:
                index.token_next[state << 32 | token] = self.quiet_before << 16
            return
        step = self._held_now()
        if step < 0:
            return
        self.held, self.held_tokens, self.held_offset = step >> 16, step >> 8 & 255, step & 255
        if state >= 0 and len(index.token_next) < _MEMO_ENTRIES:
            index.token_next[state << 32 | token] = step

    def _held_now(self) -> int:
        """The held state the row is in, packed as in :attr:`PhraseIndex.token_next`, or -1: the text ends with
        a hold of the string phrases only, in plain tokens after a plain one."""
        index, stream = self.index, self.text
        if not stream.plain_tail or stream.pending:
            return -1
        text, base = stream.text, stream.char_base
        end = base + len(text)
        held = self._string_from
        if held >= end or (index.regexes and min(self._regex_from) < end) or self._held_key() is None:
            return -1
        first = stream.cut(held)
        offset = held - stream.chars(first)
        tokens = stream.tokens[first - stream.base :]
        count = len(tokens)
        # The held tokens and the one before them plain: their texts do not depend on what came before.
        if first <= stream.base or count > 255 or offset > 255 or not stream.plain_from(first - 1):
            return -1
        state = index.held_state(index.before_key(text[held - base - 1]), offset, tuple(tokens))
        return state << 16 | count << 8 | offset if state >= 0 else -1

    def _releases(self, old_end: int) -> bool:
        """Whether the new text (after ``old_end``) ends the one held word and begins nothing: the held text holds
        no other place a string phrase may begin, the held text with the new text is no longer the beginning of a
        phrase and holds none, no regex holds text, and the new text alone, after the held text, is a quiet step
        (:meth:`PhraseIndex.quiet_after`, kept in the quiet steps' answers). ``False`` when any of it may not
        hold: the analysis tells."""
        index, stream, held = self.index, self.text, self._string_from
        text, base = stream.text, stream.char_base
        if index.regexes and min(self._regex_from) < old_end:
            return False
        for group in index.groups:
            if group.starts.search(text, held - base + 1, old_end - base) is not None:
                return False
            tail = _normalize(text[held - base :], group.fold)
            if group.automaton.match(tail) or next(group.automaton.iter(tail), None) is not None:
                return False
        piece = text[old_end - base - 1 :]
        before = index.before_key(piece[0])
        after = index.quiet.get((before, piece[1:]))
        return (after if after is not None else index.learn_quiet_step(before, piece)) >= 0

    def _held_key(self) -> str | None:
        """The key of the string phrases' answer for the text from where the hold began (one character before it
        included) to the end, or ``None`` when that text does not lie whole in the stream or is longer than a
        match can be (then the general analysis runs)."""
        stream, held = self.text, self._string_from
        base = stream.char_base
        if held <= base or held < stream.head_end or base + len(stream.text) - held > self.index.need_chars:
            return None
        return self.index.string_key(stream.text[held - base - 1 :])

    def _start(self, ids: Sequence[int], first: int) -> None:
        n = len(ids)
        self.first = first
        self.text.reset([int(i) for i in ids[: n - 1]], min(first, n - 1))
        self.synced = True
        self._rescan_from(self.text.head_end)

    def _rescan_from(self, position: int) -> None:
        start = max(position, self.text.head_end)
        self._string_from = start
        self._regex_from = [start] * len(self.index.regexes)
        self.quiet_before = -1
        self.held = -1

    def _leave_quiet(self, end: int) -> None:
        """After quiet steps up to the text's end ``end`` (before any new text): nothing is held there."""
        if self.quiet_before >= 0:
            self._string_from = end
            self._regex_from = [end] * len(self.index.regexes)
            self.quiet_before = -1

    @property
    def string_from(self) -> int:
        """Where trailing text that may still become a string phrase begins (the text's end: none)."""
        if self.quiet_before >= 0:
            return self.text.end
        if self.held >= 0:
            return self.text.chars(self.text.length - self.held_tokens) + self.held_offset
        return self._string_from

    @property
    def regex_from(self) -> list[int]:
        """Per regular expression, where trailing text that may still become its match begins."""
        if self.quiet_before >= 0 or self.held >= 0:
            return [self.text.end] * len(self._regex_from)
        return list(self._regex_from)

    def _analyse(self, n: int, prompt_length: int, old_end: int, final: bool) -> PhraseScan:
        index = self.index
        stream = self.text
        text = stream.text
        base = stream.char_base
        end = base + len(text)
        best: tuple[int, int, int, str, str] | None = None  # (token, char, phrase index, phrase, text)

        # The usual step (not the last, the text grown, nothing rewritten, the held text inside the stream):
        # what it finds depends only on the text from where the hold began (one character before it for the word
        # boundary) -- a phrase completed now began at a held position -- so earlier steps' answers are reused.
        usual = (
            not final
            and end > old_end
            and not stream.pending
            and stream.changed_from is None
            and stream.head_end <= old_end
        )
        held = self._string_from
        key = self._held_key() if usual and index.groups else None

        # 1. String phrases completed by the new text: the automaton over the tail that a new match can span.
        # 3. Strings: where the trailing text that may still become a phrase begins.
        known = index.string_holds.get(key) if key is not None else None
        if known is not None:  # no phrase completed; the hold moved by `known` characters (-1: none held)
            self._string_from = end if known < 0 else held + known
        else:
            hit = False
            if end > old_end:
                # In the usual step a phrase completed now began where the hold began (see above): the automaton
                # reads from there, so that hits of phrases completed earlier neither cost a look nor keep the
                # answer from being remembered.
                lo = max(base, min(held, old_end) if usual else old_end - index.need_chars)
                for group in index.groups:
                    hits = list(group.automaton.iter(_normalize(text[lo - base :], group.fold)))
                    if hits:  # rare: most tokens complete no phrase
                        hit = True
                        best = self._string_match(group, hits, lo, prompt_length, old_end, final, best)
            self._string_from = self._string_hold(text, base, end, final)
            if key is not None and not hit and len(index.string_holds) < _MEMO_ENTRIES:
                index.string_holds[key] = -1 if self._string_from >= end else self._string_from - held

        # 2. Regular expressions, each searched from where its previous search stopped. In the usual step only
        # those holding text and those that may begin inside the new text (whatever came before it) are
        # searched: usually none.
        if index.regexes:
            if usual and index.prefilters is not None and old_end > base:
                piece = text[old_end - base - 1 :]  # the new text after one character of the old
                candidates = index.candidates.get(index.piece_key(piece))
                if candidates is None:
                    candidates = index.regex_candidates(piece)
                if candidates or min(self._regex_from) < old_end:
                    best = self._regex_match(prompt_length, old_end, final, best, candidates)
                else:
                    self._regex_from = [end] * len(index.regexes)
            else:
                best = self._regex_match(prompt_length, old_end, final, best)

        if best is not None:
            token, _, _, source, matched = best
            return PhraseScan(PhraseMatch(token, source, matched), n - token)
        hold_from = min(self._string_from, min(self._regex_from)) if index.regexes else self._string_from
        tokens = n - stream.cut(hold_from) if hold_from < end else 0
        if not final:  # bytes of an unfinished character may still become the start of a phrase
            tokens = max(tokens, stream.pending)
        if usual and tokens == 0 and hold_from >= end:
            self.quiet_before = index.before_key(text[-1])  # nothing held: the next step may be a quiet one
        return _holding(min(tokens, n - prompt_length))

    def _string_match(
        self,
        group: _StringGroup,
        hits: list[Any],
        lo: int,
        prompt_length: int,
        old_end: int,
        final: bool,
        best: tuple[int, int, int, str, str] | None,
    ) -> tuple[int, int, int, str, str] | None:
        """``best`` or an earlier string phrase among ``group``'s ``hits`` over the text from ``lo`` on that the
        new text completes (its boundaries checked)."""
        index = self.index
        stream = self.text
        text = stream.text
        base = stream.char_base
        end = base + len(text)
        head_end = stream.head_end
        at_row_start = head_end == base and stream.base <= self.first
        prompt_chars = stream.chars(prompt_length)
        norm = _Normalized(text[lo - base :], group.fold)  # the way back to raw offsets
        identity = not norm.shifts
        for norm_end, (length, head, tail, phrase) in hits:
            if identity:
                s, e = lo + norm_end + 1 - length, lo + norm_end + 1
            else:
                s, e = lo + norm.raw(norm_end + 1 - length), lo + norm.raw(norm_end) + 1
            if e <= prompt_chars or s < head_end:
                continue
            if head and s > base and _is_word(text[s - base - 1]):
                continue
            if head and s == base and not at_row_start:
                continue
            if tail and e < end:
                if _is_word(text[e - base]):
                    continue
                confirm = e
            elif tail and not final:
                continue  # at the text's end: not confirmed yet (held back below)
            else:
                confirm = e - 1
            if confirm < old_end:
                continue
            token = max(stream.cut(s), prompt_length)
            candidate = (token, s, phrase, index.matcher.phrases[phrase], text[s - base : e - base])
            if best is None or candidate[:3] < best[:3]:
                best = candidate
        return best

    def _regex_match(
        self,
        prompt_length: int,
        old_end: int,
        final: bool,
        best: tuple[int, int, int, str, str] | None,
        candidates: tuple[int, ...] | None = None,
    ) -> tuple[int, int, int, str, str] | None:
        """``best`` or an earlier regular-expression match that the new text completes; moves each regex's
        hold. A match spans at most max_match_chars characters, so a partial match that began earlier than
        that before the end is none. ``candidates``: the regexes that may begin inside the new text (the usual
        step); only those and the ones holding text are searched."""
        index = self.index
        stream = self.text
        text = stream.text
        base = stream.char_base
        end = base + len(text)
        head_end = stream.head_end
        prompt_chars = stream.chars(prompt_length)
        body = end - base
        floor = max(head_end, old_end - index.need_chars) - base
        earliest = end - index.max_match_chars - base
        new_from, prompt_end = old_end - base, prompt_chars - base
        todo: Sequence[int] = range(len(index.regexes))
        skip_to = floor
        if candidates is not None:
            # A regex holding nothing that cannot begin inside the new text finds nothing from the old end on.
            todo = [r for r, position in enumerate(self._regex_from) if position < old_end or r in candidates]
            self._regex_from = [position if r in todo else end for r, position in enumerate(self._regex_from)]
        elif index.regexes and index.gate is not None:
            # One search of the alternation of all of them: usually nothing (then nothing is new or held),
            # otherwise none of them has anything before where it found something. A second one over the new
            # text only: when it finds nothing, only the regexes that were holding text need a look.
            lowest = min(max(min(self._regex_from) - base, floor), body)
            m = index.gate.search(text, lowest, body, partial=True)
            if m is None or m.start() == m.end() == body:  # (the empty partial match at the very end: nothing)
                todo = range(0)
                self._regex_from = [end] * len(index.regexes)
            else:
                skip_to = max(floor, m.start())
                fresh = max(skip_to, min(old_end - base, body))
                m = index.gate.search(text, fresh, body, partial=True) if fresh > skip_to else m
                if fresh > skip_to and (m is None or m.start() == m.end() == body):
                    todo = [r for r, position in enumerate(self._regex_from) if position < old_end]
                    self._regex_from = [position if position < old_end else end for position in self._regex_from]
        for r in todo:
            phrase, pattern = index.regexes[r]
            position = min(max(self._regex_from[r] - base, skip_to), body)
            hold: int | None = None
            partial_from: int | None = None
            found: tuple[int, int] | None = None
            while position <= body:
                m = pattern.search(text, position, body, partial=True)
                if m is None:
                    break
                s, e = m.span()
                if m.partial or (e >= body and not final):
                    if e > s and partial_from is None:
                        partial_from = s
                    if e > s and s >= earliest:
                        hold = s
                        break
                    position = max(s + 1, earliest)
                    continue
                if e > s and self._new(e, body, final, new_from, prompt_end):
                    found = (s, e)
                    break
                position = s + 1
            if partial_from is not None and found is None:
                # A partial match may hide a complete one at or after it: one plain search from there.
                for m in pattern.finditer(text, partial_from, body):
                    s, e = m.span()
                    if e > s and (final or e < body) and self._new(e, body, final, new_from, prompt_end):
                        found = (s, e)
                        break
            self._regex_from[r] = base + (hold if hold is not None else body)
            if found is not None:
                s, e = found
                token = max(stream.cut(base + s), prompt_length)
                candidate = (token, base + s, phrase, index.matcher.phrases[phrase], text[s:e])
                if best is None or candidate[:3] < best[:3]:
                    best = candidate
        return best

    @staticmethod
    def _new(e: int, body: int, final: bool, old_end: int, prompt_chars: int) -> bool:
        """A complete regex match ending at ``e`` (relative) is confirmed by the new text."""
        confirm = e - 1 if e >= body else e
        return confirm >= old_end and e > prompt_chars

    def _string_hold(self, text: str, base: int, end: int, final: bool) -> int:
        """Where the trailing text that may still become a string phrase begins (``end``: none)."""
        position = min(max(self._string_from, self.text.head_end, end - 2 * self.index.need_chars), end)
        held = end
        for group in self.index.groups:
            held = self._group_hold(group, text, base, position, held, final)
        return held

    @staticmethod
    def _group_hold(group: _StringGroup, text: str, base: int, position: int, end: int, final: bool) -> int:
        """The first start from ``position`` on, before ``end``, of text that may still become one of ``group``'s
        phrases, or ``end``."""
        automaton = group.automaton
        for m in group.starts.finditer(text, position - base, end - base):
            tail = _normalize(text[m.start() :], group.fold)
            if not automaton.match(tail):
                continue
            value = automaton.get(tail, None)
            if value is None or (value[2] and not final):
                return base + m.start()  # the beginning of a phrase, or one whose end is not confirmed yet
            # A whole phrase that needs nothing after it was reported (or kept) already: it is held only as
            # the beginning of a longer phrase.
            if any(key != tail for key in islice(automaton.keys(tail), 2)):
                return base + m.start()
        return end
