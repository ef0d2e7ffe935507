"""The reasons to rewind that come with the library: a sampled EOS, a completed ending or banned phrase, a
repetition loop."""

from __future__ import annotations

from collections.abc import Collection

from ..protocol import RewindRule, RewindTo, RowView
from ..text.matcher import PhraseMatcher
from ..text.phrase_stream import PhraseStream
from ..text.repetition import LoopTracker
from .config import LoopDetection

__all__ = ["EOSRule", "LoopRule", "PhraseRule"]


class EOSRule(RewindRule):
    """Methods 3 and 4: a sampled EOS cuts the row back ``n_remove`` tokens (the EOS is refused).

    Stateless: the budget (``max_backsteps``), what happens once it is spent (``on_exhausted``) and the
    clamp belong to :class:`~perpetual_logits.backstep.policy.RewindPolicy`.

    Args:
        eos: the ids that end a row.
        n_remove: tokens removed before the EOS.
        ban_rewound: forbid the first removed token at the rewind point (needed under greedy decoding), for
            every row; :attr:`ban_rows` may set it per row after :meth:`start`.
    """

    reason = "eos"

    def __init__(self, eos: Collection[int], n_remove: int, ban_rewound: bool = False) -> None:
        self.eos = frozenset(eos)
        self.ban_here = tuple(sorted(self.eos))
        self.n_remove = n_remove
        self.ban_rewound = ban_rewound
        self.ban_rows: list[bool] = []

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.ban_rows = [self.ban_rewound] * batch_size

    def check(self, view: RowView) -> RewindTo | None:
        if view.ids[-1] not in self.eos:
            return None
        return RewindTo(
            position=len(view.ids) - 1 - self.n_remove,
            ban_here=self.ban_here,  # the regenerated token must not end the row at once
            ban_first_removed=self.ban_rows[view.row],
            reason=self.reason,
        )


class PhraseRule(RewindRule):
    """Rewinds a row whose decoded text completes a phrase, however the tokens spelled it.

    Two modes:

    * ``"ending"`` (``BackstepConfig.end_phrases``): the phrase is the model ending its text ("The End", a
      spelled ``<|im_end|>``, "I hope this helps"). Handled like a sampled EOS: the row is cut back
      ``n_remove`` tokens before the phrase began, the phrase's first token is forbidden at its start, EOS is
      forbidden at the rewind point and the schedule restarts, so the ending is rewritten (hotter), not glued
      onto text that had already finished.
    * ``"ban"`` (``BackstepConfig.ban_phrases``): the phrase is a word to avoid mid-text. The row is cut back to
      the token where the phrase began, and that token is forbidden there.

    Args:
        matcher: finds the phrases in a row's text.
        mode: ``"ending"`` or ``"ban"``.
        n_remove: tokens removed before an ending.
        max_rewinds: rewinds allowed per row; afterwards phrases are kept.
        eos: the EOS ids (forbidden at an ending's rewind point).
    """

    def __init__(
        self, matcher: PhraseMatcher, mode: str, n_remove: int, max_rewinds: int, eos: Collection[int]
    ) -> None:
        if mode not in ("ending", "ban"):
            raise ValueError(f"`mode` must be 'ending' or 'ban', got {mode!r}")
        self.matcher = matcher
        self.mode = mode
        self.reason = "ending" if mode == "ending" else "phrase"
        self.n_remove = n_remove
        self.max_rewinds = max_rewinds
        self.eos = tuple(eos)
        self.used: list[int] = []
        self.hold: list[int] = []
        self.unfinished: list[int] = []
        self.streams: list[PhraseStream] = []  # per row: its text and matching state, fed one token at a time

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.used = [0] * batch_size
        self.hold = [0] * batch_size
        self.unfinished = [0] * batch_size
        self.streams = [PhraseStream(self.matcher) for _ in range(batch_size)]

    def rewind(self, row: int, length: int) -> None:
        self.hold[row] = 0
        self.unfinished[row] = 0
        self.streams[row].rewind(length)

    def held(self, row: int) -> int:
        return self.hold[row]

    def partial(self, row: int) -> int:
        """Trailing tokens of ``row`` that begin a phrase not (yet) completed: dropped if the row must end now."""
        return self.unfinished[row]

    def check(self, view: RowView) -> RewindTo | None:
        scan = self.streams[view.row].feed(view.ids, view.prompt_length, view.text_start, final=view.final)
        # An ending rewinds n_remove tokens before the phrase: those must not be streamed while it may complete.
        extra = self.n_remove if self.mode == "ending" and scan.hold else 0
        self.hold[view.row] = scan.hold + extra
        self.unfinished[view.row] = scan.hold
        match = scan.match
        if match is None or self.used[view.row] >= self.max_rewinds:
            return None
        self.used[view.row] += 1
        begin = match.start
        if self.mode == "ban":
            return RewindTo(position=begin, ban_first_removed=True, reason=self.reason, detail=match.phrase)
        return RewindTo(
            position=begin - self.n_remove,
            bans={begin: (view.ids[begin],)},
            ban_here=self.eos,
            reason=self.reason,
            detail=match.phrase,
        )


class LoopRule(RewindRule):
    """Rewinds a row that fell into a repetition loop to where the repeat began (one copy stays), forbids the
    token that started the repeat there and restarts the schedule. What counts as a loop: see
    :class:`~perpetual_logits.text.repetition.LoopTracker` (one per row, fed one token at a time).

    Args:
        settings: what counts as a loop.
        newline_ids: ids of tokens that end a line (see :func:`~perpetual_logits.text.repetition.newline_token_ids`),
            or ``None`` to check token spans only.
        word_ids: ids of tokens with a letter (:func:`~perpetual_logits.text.repetition.word_token_ids`), or ``None``
            to treat every span as words.
    """

    reason = "loop"

    def __init__(
        self, settings: LoopDetection, newline_ids: Collection[int] | None, word_ids: Collection[int] | None = None
    ) -> None:
        self.settings = settings
        self.newline_ids = frozenset(newline_ids) if newline_ids is not None else None
        self.word_ids = frozenset(word_ids) if word_ids is not None else None
        self.used: list[int] = []
        self.trackers: list[LoopTracker | None] = []

    def start(self, batch_size: int, prompt_length: int) -> None:
        self.used = [0] * batch_size
        self.trackers = [None] * batch_size

    def rewind(self, row: int, length: int) -> None:
        tracker = self.trackers[row] if row < len(self.trackers) else None
        if tracker is not None:
            tracker.rewind(length)

    def check(self, view: RowView) -> RewindTo | None:
        s = self.settings
        row, ids = view.row, view.ids
        if self.used[row] >= s.max_rewinds:
            return None
        tracker = self.trackers[row]
        n = len(ids)
        if tracker is None or len(tracker.ids) != n - 1 or (n > 1 and tracker.ids and tracker.ids[-1] != ids[n - 2]):
            tracker = self.trackers[row] = LoopTracker(
                s.min_span,
                s.max_span,
                s.min_repeats,
                s.min_loop_tokens,
                s.symbol_loop_tokens,
                s.line_repeats,
                s.min_line_tokens,
                s.window_lines,
                self.newline_ids if s.line_repeats else None,
                self.word_ids,
            )
            tracker.start(ids[: n - 1], max(view.prompt_length, view.text_start))
        match = tracker.push(int(ids[n - 1]))
        if match is None:
            return None
        self.used[row] += 1
        detail = f"{match.kind} loop: span {match.span} x {match.repeats}"
        return RewindTo(position=match.start, ban_first_removed=True, reason=self.reason, detail=detail)
