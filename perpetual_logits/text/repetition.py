"""Loop detection on a growing row of token ids: pure, torch-free functions cheap enough for every step.

A model that is kept writing past its natural end often falls into a loop: SmolLM2-135M-Instruct, asked for
a poem and denied EOS, writes "A season to cherish, a time to forget," over and over. Two detectors find
where such a loop began, so that the caller can rewind the row there, forbid the token that started the
repeat and resample:

* :func:`find_token_loop` — the row's newest tokens are the same span of tokens written back to back
  (``" forever forever forever ..."``, ``"I'm glad you're sharing your expertise. I'm glad ..."``);
* :func:`find_line_loop` — the line just completed is a copy of a recent line (the poem above, whose loop
  alternates between a few lines and so is never one span repeated back to back).

:class:`LoopTracker` is what the loop rewinds use: per row and incremental, and stricter about what a loop is
(only text written again back to back; a line repeated with others between is structure, not a loop).

Both functions only look at the end of the row, so they are meant to be called after every new token (the line
detector does nothing unless the newest token ends a line). Both return a :class:`LoopMatch` whose
``start`` is the index of the first token of the *repeat* — the second copy — so that cutting the row back
to ``start`` tokens keeps one copy, and ``ids[start]`` is the token to forbid at that position.

Defaults (measured on SmolLM2-135M-Instruct, see ``benchmarks/quality_chat.py``): a token loop needs
``min_repeats=3`` copies and at least ``min_loop_tokens=8`` tokens in all (so a one-token span such as a
digit of "1,000,000" needs 8 copies), spans up to 32 tokens; :func:`find_line_loop`'s line loop is a line of
at least 4 tokens seen again within the last 16 lines. The loop rewinds (:class:`LoopTracker`, the defaults of
``LoopDetection``) keep the token rule, ask 64 tokens of spans without letters or across a line end, and count
lines only when a block of them is repeated back to back.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .. import _validation

__all__ = ["LoopMatch", "LoopTracker", "find_line_loop", "find_token_loop", "newline_token_ids", "word_token_ids"]


@dataclass(frozen=True)
class LoopMatch:
    """A repetition at the end of a row.

    Attributes:
        start (`int`): index in the row of the first token of the second copy: cut the row back to ``start``
            tokens to keep one copy, and forbid ``ids[start]`` there. Always ``>= `` the ``start`` argument of
            the detector and ``< len(ids)``.
        first (`int`): index of the first token of the first copy (the repeated text begins there).
        span (`int`): tokens per copy (for a line loop: from the earlier line's first token to the repeat's).
        repeats (`int`): copies found, the original included (a line loop: occurrences of the line).
        kind (`str`): ``"token"`` or ``"line"``.
    """

    start: int
    first: int
    span: int
    repeats: int
    kind: str


def _check_ids(ids: Sequence[int], start: int) -> int:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"`ids` must be a list of token ids, got {type(ids).__name__}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(ids):
        raise ValueError(f"`start` must be an int in [0, len(ids)={len(ids)}], got {start!r}")
    return start


def find_token_loop(
    ids: Sequence[int],
    start: int = 0,
    min_span: int = 1,
    max_span: int = 32,
    min_repeats: int = 3,
    min_loop_tokens: int = 8,
) -> LoopMatch | None:
    """Whether the row *ends* with one span of tokens written several times back to back.

    For each span length ``p`` in ``[min_span, max_span]`` the newest ``p * r`` tokens are tested for being
    ``r`` copies of one span, with ``r = max(min_repeats, ceil(min_loop_tokens / p))``: short spans need more
    copies, so "very, very" or the zeros of "1,000,000" are not loops, while ``" forever"`` written 8 times
    is. The shortest such ``p`` wins. The loop is then followed backwards as far as the row stays periodic
    (never before ``start``), so ``first`` is where the repetition really began and ``start`` of the result
    is one span later. A match is only reported when the *newest* token completes it, so calling this after
    every token reports a loop once, as soon as it forms.

    Cost: one comparison per span for rows that do not loop (the newest token against the token one span
    earlier), ``O(max_span * r)`` list comparisons in C otherwise; no allocation beyond slices.

    Args:
        ids (`Sequence[int]`): the row's token ids, prompt included.
        start (`int`, defaults to 0): index of the first token that may be part of a loop (the prompt length,
            or the first token that can still be rewound); tokens before it are never examined.
        min_span (`int`, defaults to 1): shortest span, in tokens; >= 1.
        max_span (`int`, defaults to 32): longest span; >= ``min_span``.
        min_repeats (`int`, defaults to 3): copies back to back that make a loop; >= 2.
        min_loop_tokens (`int`, defaults to 8): tokens the copies must cover together; >= 1.

    Returns:
        `LoopMatch` or `None`.

    Example:

    >>> find_token_loop([7, 1, 2, 1, 2, 1, 2], min_loop_tokens=6)   # (1, 2) three times
    LoopMatch(start=3, first=1, span=2, repeats=3, kind='token')
    >>> find_token_loop([7, 1, 2, 1, 2, 1, 2, 1], min_loop_tokens=6) is None   # reported one token ago
    True
    >>> find_token_loop([7, 1, 2, 1, 2, 1, 3], min_loop_tokens=6) is None
    True
    >>> find_token_loop([7, 1, 2, 1, 2, 1, 2], start=3, min_repeats=2, min_loop_tokens=4)  # from index 3 on
    LoopMatch(start=5, first=3, span=2, repeats=2, kind='token')
    """
    start = _check_ids(ids, start)
    min_span = _validation.positive_int(min_span, "min_span")
    max_span = _validation.positive_int(max_span, "max_span", minimum=min_span)
    min_repeats = _validation.positive_int(min_repeats, "min_repeats", minimum=2)
    min_loop_tokens = _validation.positive_int(min_loop_tokens, "min_loop_tokens")
    n = len(ids)
    p = _loop_span(ids, n, start, min_span, max_span, min_repeats, min_loop_tokens)
    # Reported only when the newest token completes the loop: if the row was already looping one token
    # earlier (with any span), it was reported then, or the caller deliberately kept it.
    if p == 0 or _loop_span(ids, n - 1, start, min_span, max_span, min_repeats, min_loop_tokens):
        return None
    first = n - p * max(min_repeats, -(-min_loop_tokens // p))
    # The loop may have begun earlier than the copies counted: follow the period back.
    while first > start and ids[first - 1] == ids[first - 1 + p]:
        first -= 1
    return LoopMatch(start=first + p, first=first, span=p, repeats=(n - first) // p, kind="token")


def _loop_span(
    ids: Sequence[int], n: int, start: int, min_span: int, max_span: int, min_repeats: int, min_loop_tokens: int
) -> int:
    """The shortest span whose required copies make up the end of ``ids[:n]``, or 0."""
    available = n - start
    if available < 2:
        return 0
    last = ids[n - 1]
    for p in range(min_span, min(max_span, available // 2) + 1):
        # Quick reject: a periodic tail has its newest token equal to the one a span earlier.
        if ids[n - 1 - p] != last:
            continue
        need = p * max(min_repeats, -(-min_loop_tokens // p))
        if need > available:
            continue
        if ids[n - need + p : n] == ids[n - need : n - p]:
            return p
    return 0


def newline_token_ids(tokenizer: object) -> frozenset[int]:
    r"""Ids of every vocabulary token whose text contains a newline: the line ends for :func:`find_line_loop`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): anything with ``decode(list[int])`` and ``len()``.

    Example:

    >>> class Vocab:
    ...     pieces = ["a", "\n", "b", ".\n\n"]
    ...     def __len__(self):
    ...         return 4
    ...     def decode(self, ids, **kwargs):
    ...         return "".join(self.pieces[i] for i in ids)
    >>> sorted(newline_token_ids(Vocab()))
    [1, 3]
    """
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise ValueError(f"`tokenizer` must have a decode() method, got {type(tokenizer).__name__}")
    return frozenset(i for i in range(len(tokenizer)) if "\n" in decode([i]))  # type: ignore[arg-type]


def find_line_loop(
    ids: Sequence[int],
    newline_ids: Collection[int],
    start: int = 0,
    min_line_tokens: int = 4,
    window_lines: int = 16,
    min_repeats: int = 2,
    max_lookback: int = 1024,
) -> LoopMatch | None:
    r"""Whether the line the newest token just ended is a copy of a recent line.

    Lines are the token runs between tokens in ``newline_ids`` (a token whose text holds a newline ends a
    line; blank lines are skipped). Lines are compared as token tuples, without their newline token, so
    ``"A season to cherish,\n"`` equals ``"A season to cherish,\n\n"``. The newest line is a loop when it
    has at least ``min_line_tokens`` tokens and, counting itself, occurs ``min_repeats`` times among the last
    ``window_lines`` non-blank lines. The match's ``start`` is the newest line's first token: the caller cuts
    the row there (keeping the earlier copies) and forbids that token; ``first`` is the first token of the
    most recent earlier copy.

    The function does nothing (returns ``None`` after one set lookup) unless ``ids[-1]`` ends a line, and
    reads at most ``max_lookback`` tokens back, so it can be called after every token.

    Args:
        ids (`Sequence[int]`): the row's token ids, prompt included.
        newline_ids (`Collection[int]`): ids of tokens that end a line, e.g. :func:`newline_token_ids`
            (a ``set`` or ``frozenset`` for speed).
        start (`int`, defaults to 0): index of the first token that may be examined (the prompt length);
            lines that begin before it are not compared.
        min_line_tokens (`int`, defaults to 4): shortest line that counts; shorter lines ("---", "1.",
            a lone word) repeat innocently.
        window_lines (`int`, defaults to 16): how many recent non-blank lines (the newest included) are
            searched for copies; >= 2.
        min_repeats (`int`, defaults to 2): occurrences, the newest included, that make a loop; >= 2.
        max_lookback (`int`, defaults to 1024): tokens read back at most.

    Returns:
        `LoopMatch` or `None`.

    Example:

    >>> NL = 0
    >>> poem = [5, 6, 7, 8, NL, 9, 9, 9, 9, NL, 5, 6, 7, 8, NL]   # line 1, line 2, line 1 again
    >>> find_line_loop(poem, {NL})
    LoopMatch(start=10, first=0, span=10, repeats=2, kind='line')
    >>> find_line_loop(poem[:-1], {NL}) is None   # the line is not finished yet
    True
    >>> find_line_loop(poem, {NL}, min_repeats=3) is None
    True
    """
    start = _check_ids(ids, start)
    min_line_tokens = _validation.positive_int(min_line_tokens, "min_line_tokens")
    window_lines = _validation.positive_int(window_lines, "window_lines", minimum=2)
    min_repeats = _validation.positive_int(min_repeats, "min_repeats", minimum=2)
    max_lookback = _validation.positive_int(max_lookback, "max_lookback")
    n = len(ids)
    if n <= start or ids[-1] not in newline_ids:
        return None
    floor = max(start, n - max_lookback)
    lines: list[tuple[int, tuple[int, ...]]] = []  # (first token index, tokens), newest first
    end = n - 1  # index of the newline token that ends the line being collected
    i = end - 1
    while i >= floor - 1 and len(lines) < window_lines:
        if i < floor or ids[i] in newline_ids:
            body = tuple(ids[i + 1 : end])
            # The oldest line may be cut by `floor`; it only counts if it really begins there.
            complete = i >= floor or i + 1 == start
            if body and complete:
                lines.append((i + 1, body))
            if not lines:  # the newest line is blank or cut: nothing to compare
                return None
            end = i
        i -= 1
    newest_start, newest = lines[0]
    if len(newest) < min_line_tokens:
        return None
    copies = [s for s, body in lines[1:] if body == newest]
    if len(copies) + 1 < min_repeats:
        return None
    previous = copies[0]
    return LoopMatch(
        start=newest_start, first=previous, span=newest_start - previous, repeats=len(copies) + 1, kind="line"
    )


def word_token_ids(tokenizer: object) -> frozenset[int]:
    """Ids of every vocabulary token whose text holds a letter: spans without one (``"|---"``, ``", 0"``,
    ``"="``) repeat innocently in tables, arrays and rules, so :class:`LoopTracker` asks more of them.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): anything with ``decode(list[int])`` and ``len()``.

    Example:

    >>> class Vocab:
    ...     pieces = ["a", "|", "---", "é1"]
    ...     def __len__(self):
    ...         return 4
    ...     def decode(self, ids, **kwargs):
    ...         return "".join(self.pieces[i] for i in ids)
    >>> sorted(word_token_ids(Vocab()))
    [0, 3]
    """
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise ValueError(f"`tokenizer` must have a decode() method, got {type(tokenizer).__name__}")
    return frozenset(
        i
        for i in range(len(tokenizer))  # type: ignore[arg-type]
        if any(char.isalpha() for char in decode([i]))
    )


def _need(p: int, min_repeats: int, min_loop_tokens: int) -> int:
    """Tokens of copies in all that a span of ``p`` tokens needs to be a loop."""
    return p * max(min_repeats, -(-min_loop_tokens // p))


@lru_cache(maxsize=64)
def _span_tables(
    max_span: int, min_repeats: int, min_loop_tokens: int, symbol_loop_tokens: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per span ``p`` (index 0 unused): ``least[p]``, the newest tokens that must equal the token ``p`` before
    them (the run of ``p``), and ``enough[p]``, the run beyond which no decision changes (only the reported loop's
    start, not needed while looping). The same for every row with these settings: built once, not per row."""
    least = (0, *(_need(p, min_repeats, min_loop_tokens) - p for p in range(1, max_span + 1)))
    enough = (0, *(max(least[p], symbol_loop_tokens - p) for p in range(1, max_span + 1)))
    return least, enough


class LoopTracker:
    """One row's incremental loop detection: what a *degenerate* repetition is, decided per new token in time
    that does not grow with the row (no window is rescanned).

    A loop is text written again **back to back**:

    * **a span of tokens repeated**: the newest tokens are ``r`` copies of one span of ``p`` tokens with
      ``r >= min_repeats`` and ``p * r >= min_loop_tokens`` (``" forever forever forever"``, a sentence
      written three times in a row). Only span lengths ``p`` whose token ``p`` back is the new token are
      looked at (one search of the newest ``max_span`` tokens), counting how many newest tokens equal the token
      ``p`` before them. A span without a letter
      (``"|---"``, ``", 0"``, ``"="``: table rules, zero arrays) or one that crosses a line end (``"i++;\\n"``)
      is ordinary structure until its copies cover ``symbol_loop_tokens`` tokens.
    * **lines cycling**: the newest ``k`` lines are the same as the ``k`` lines before them, ``line_repeats``
      times over (a single line needs one copy more), all within the last ``window_lines`` lines, the block
      holding at least ``min_line_tokens`` tokens (the poem that alternates between a few lines). Lines are
      compared as token tuples, blank lines skipped; each finished line is hashed once.

    Not a loop: a repeated line with other lines between (a JSON object per user, a repeated ``for`` header
    or ``print`` line, a chorus after each verse, the rows of a table, the steps of a recipe).

    Args:
        min_span, max_span, min_repeats, min_loop_tokens: the token-span rule (see :func:`find_token_loop`).
        symbol_loop_tokens (`int`): tokens a span without letters, or crossing a line end, must cover.
        line_repeats (`int`): back-to-back copies of a block of lines (0: no line rule).
        min_line_tokens (`int`): tokens a repeated block of lines must hold.
        window_lines (`int`): the copies lie within this many newest non-blank lines.
        newline_ids (`Collection[int]` or `None`): tokens that end a line (:func:`newline_token_ids`); without
            them there is no line rule and no line-end exception.
        word_ids (`Collection[int]` or `None`): tokens with a letter (:func:`word_token_ids`); without them
            every span counts as words.

    Example:

    >>> tracker = LoopTracker(min_repeats=3, min_loop_tokens=6)
    >>> tracker.start([7], 1)
    >>> [tracker.push(t) for t in [1, 2, 1, 2, 1, 2]][-1]
    LoopMatch(start=3, first=1, span=2, repeats=3, kind='token')
    """

    def __init__(
        self,
        min_span: int = 1,
        max_span: int = 32,
        min_repeats: int = 3,
        min_loop_tokens: int = 8,
        symbol_loop_tokens: int = 64,
        line_repeats: int = 2,
        min_line_tokens: int = 4,
        window_lines: int = 16,
        newline_ids: Collection[int] | None = None,
        word_ids: Collection[int] | None = None,
    ) -> None:
        self.min_span = min_span
        self.max_span = max_span
        self.min_repeats = min_repeats
        self.min_loop_tokens = min_loop_tokens
        self.symbol_loop_tokens = symbol_loop_tokens
        self.line_repeats = line_repeats
        self.min_line_tokens = min_line_tokens
        self.window_lines = window_lines
        self.newline_ids = frozenset(newline_ids) if newline_ids is not None else None
        self.word_ids = frozenset(word_ids) if word_ids is not None else None
        # What a span of p tokens needs: `_need(p)` tokens of copies in all, i.e. `least[p]` newest tokens equal
        # to the token p before them (the run of p). When every span needs at least one such token, only spans
        # whose token p back equals the new token can complete a loop: the others are not looked at.
        self.least, self.enough = _span_tables(max_span, min_repeats, min_loop_tokens, symbol_loop_tokens)
        self.only_repeats = min(self.least[min_span:], default=1) >= 1
        # When every span needs two or more such tokens (the defaults: at least 7), the newest two tokens must
        # both equal the two p before them: only a pair of tokens written again within max_span can complete a
        # loop. In text most repeated tokens are common words whose pair with the token before is new.
        self.only_pair_repeats = min(self.least[min_span:], default=2) >= 2
        # The row, from `begin` on (tokens before it are never part of a loop).
        self.ids: list[int] = []
        self.begin = 0
        # Where each token was last written (an index into ids) -- or, with only_pair_repeats, each pair of
        # neighbouring tokens (keyed ``first << 32 | second``, at its second): a new one last seen more than
        # max_span back repeats no span, which is the usual token, decided without looking at the window.
        self.last_seen: dict[int, int] = {}
        self.looping = False  # the previous token already ended a loop (reported then, or kept)
        # Finished non-blank lines: (first token index, token tuple), oldest first, and where the current
        # line began.
        self.lines: list[tuple[int, tuple[int, ...]]] = []
        self.line_start = 0

    def start(self, ids: Sequence[int], begin: int) -> None:
        """Begin with the row ``ids`` (prompt included); loops may start at ``begin`` or later."""
        self.ids = [int(i) for i in ids]
        self.begin = begin
        self._recount()

    def rewind(self, length: int) -> None:
        """The row was cut back to ``length`` tokens."""
        del self.ids[max(length, 0) :]
        self._recount()

    def push(self, token_id: int) -> LoopMatch | None:
        """Append the row's next token; a loop the newest token completes, or ``None``."""
        ids = self.ids
        ids.append(token_id)
        n = len(ids)
        if self.only_pair_repeats and n == 1:
            seen = -1  # no pair yet
        else:
            key = ids[n - 2] << 32 | token_id if self.only_pair_repeats else token_id
            seen = self.last_seen.get(key, -1)
            self.last_seen[key] = n - 1
        if self.only_repeats and seen < n - 1 - self.max_span:
            # The usual token: it (or, where spans need two repeated tokens, its pair with the token before) was
            # not written within max_span, so it repeats no span (and ends any loop).
            self.looping = False
            newline_ids = self.newline_ids
            return None if newline_ids is None or token_id not in newline_ids else self._line(token_id)
        # Spans p the row can hold a copy of (the token p back lies at `begin` or later), shortest first.
        longest = min(self.max_span, n - 1 - self.begin)
        span = run = 0
        if longest >= self.min_span and not (self.only_repeats and seen < n - 1 - longest):
            if self.only_repeats:
                back = ids[n - 1 - longest : n - 1]  # reversed below: back[p - 1] is the token p before the new one
                back.reverse()
                spans = []
                if token_id in back:
                    k = -1
                    for _ in range(back.count(token_id)):
                        k = back.index(token_id, k + 1)
                        spans.append(k + 1)
            else:
                spans = list(range(1, longest + 1))
            for p in spans:
                if p < self.min_span:
                    continue
                run = self._run(p, self.enough[p] if self.looping else n)
                if run >= self.least[p] and self._counts(p, run):
                    span = p
                    break
        match = None
        if span and not self.looping:
            first = n - span - run
            match = LoopMatch(start=first + span, first=first, span=span, repeats=(n - first) // span, kind="token")
        self.looping = bool(span)
        line = self._line(token_id)  # (a line end finishes a line, also after a loop)
        return match if match is not None else line

    # -- internals ---------------------------------------------------------------------------------------
    def _run(self, p: int, limit: int) -> int:
        """How many newest tokens equal the token ``p`` before them (within the row from ``begin``; at most
        ``limit``)."""
        ids, begin = self.ids, self.begin
        i = len(ids) - 1
        run = 0
        while run < limit and i - p >= begin and ids[i] == ids[i - p]:
            run += 1
            i -= 1
        return run

    def _counts(self, p: int, run: int) -> bool:
        """Whether the span of the newest ``p`` tokens, with ``run`` tokens of copies after its first, makes a
        loop."""
        span = self.ids[len(self.ids) - p :]
        plain = (self.word_ids is None or any(t in self.word_ids for t in span)) and (
            self.newline_ids is None or not any(t in self.newline_ids for t in span)
        )
        return plain or p + run >= max(self.least[p] + p, self.symbol_loop_tokens)  # least[p] + p: _need(p)

    def _recount(self) -> None:
        """Rebuild the line records from the row (after a start or a rewind); runs are counted when asked."""
        ids, n = self.ids, len(self.ids)
        if self.only_pair_repeats:
            self.last_seen = {ids[i - 1] << 32 | ids[i]: i for i in range(1, n)}
        else:
            self.last_seen = {token: i for i, token in enumerate(ids)}
        self.looping = False
        self.lines = []
        self.line_start = self.begin
        if self.newline_ids is None:
            return
        start = self.begin
        for i in range(self.begin, n):
            if ids[i] in self.newline_ids:
                if i > start:
                    self.lines.append((start, tuple(ids[start:i])))
                start = i + 1
        self.line_start = start
        del self.lines[: max(0, len(self.lines) - self.window_lines)]

    def _line(self, token_id: int) -> LoopMatch | None:
        if self.newline_ids is None or token_id not in self.newline_ids:
            return None
        n = len(self.ids)
        start, self.line_start = self.line_start, n
        if n - 1 <= start:
            return None  # a blank line
        self.lines.append((start, tuple(self.ids[start : n - 1])))
        if len(self.lines) > self.window_lines:
            del self.lines[0]
        if not self.line_repeats:
            return None
        lines = self.lines
        for k in range(1, len(lines) // self.line_repeats + 1):
            copies = self.line_repeats + (1 if k == 1 else 0)
            if k * copies > len(lines):
                break
            block = [body for _, body in lines[-k:]]
            if sum(len(body) for body in block) < self.min_line_tokens:
                continue
            if self.word_ids is not None and not any(t in self.word_ids for body in block for t in body):
                continue
            if all([body for _, body in lines[len(lines) - (c + 1) * k : len(lines) - c * k]] == block
                   for c in range(1, copies)):  # fmt: skip
                previous = lines[len(lines) - 2 * k][0]
                newest = lines[len(lines) - k][0]
                return LoopMatch(start=newest, first=previous, span=newest - previous, repeats=copies, kind="line")
        return None
