"""``BackstepConfig``: the settings of backstep generation (Methods 3 and 4), validated at construction."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .. import _validation
from .._moved import old_names
from ..protocol import RewindRule
from ..schedules import LinearDecay, Schedule
from ..triggers import EarlyTrigger
from ..truncation import Widening
from .landing import Landing
from .window import ContextShift

if not TYPE_CHECKING:  # the old name, for one release
    __getattr__ = old_names(__name__, {"LoopRewinds": (__name__, "LoopDetection")})

__all__ = ["BackstepConfig", "LoopDetection"]

_EXHAUSTED = ("suppress", "stop")
PhraseList = Sequence[str | re.Pattern[str]]


@dataclass(frozen=True)
class LoopDetection:
    """Settings of loop detection: a row whose newest tokens repeat an earlier span is cut back to where the
    repeat began (one copy is kept), the token that started the repeat is forbidden there, and the row
    resamples (hotter, with a schedule). Detection is :func:`~perpetual_logits.text.repetition.find_token_loop`
    and, with a tokenizer, :func:`~perpetual_logits.text.repetition.find_line_loop`.

    Args:
        min_span (`int`, defaults to 1): the shortest repeated span of tokens that counts.
        max_span (`int`, defaults to 32): the longest span looked for (bounds the work per token).
        min_repeats (`int`, defaults to 3): back-to-back copies of a span that make a loop.
        min_loop_tokens (`int`, defaults to 8): tokens the copies must cover together (a one-token span needs
            8 copies: "very, very" is not a loop).
        symbol_loop_tokens (`int`, defaults to 64): a span without letters (``"|---"``, ``", 0"``) or one
            that crosses a line end is structure (table rules, arrays, repeated short statements) until its
            copies cover this many tokens.
        line_repeats (`int`, defaults to 2): the newest lines repeating the block of lines just before them,
            this many copies back to back (a single line: one more), are a loop too; 0 turns line checks off
            (they need the tokenizer). A line repeated with other lines between is not a loop.
        min_line_tokens (`int`, defaults to 4): a repeated block of lines must hold this many tokens (blank
            lines, list bullets and lone braces never count).
        window_lines (`int`, defaults to 16): the copies lie within this many newest non-blank lines.
        max_rewinds (`int`, defaults to 50): loop rewinds allowed per row; afterwards loops are kept.

    Example:

    ```python
    >>> from perpetual_logits import LoopDetection
    >>> LoopDetection().max_span
    32
    >>> LoopDetection(min_span=8, max_span=4)
    Traceback (most recent call last):
    ...
    ValueError: `max_span` must be >= min_span (8), got 4

    ```
    """

    min_span: int = 1
    max_span: int = 32
    min_repeats: int = 3
    min_loop_tokens: int = 8
    line_repeats: int = 2
    min_line_tokens: int = 4
    window_lines: int = 16
    max_rewinds: int = 50
    symbol_loop_tokens: int = 64

    def __post_init__(self) -> None:
        _validation.positive_int(self.min_span, "min_span")
        _validation.positive_int(self.max_span, "max_span")
        if self.max_span < self.min_span:
            raise ValueError(f"`max_span` must be >= min_span ({self.min_span}), got {self.max_span}")
        _validation.positive_int(self.min_repeats, "min_repeats", minimum=2)
        _validation.positive_int(self.min_loop_tokens, "min_loop_tokens")
        _validation.positive_int(self.line_repeats, "line_repeats", minimum=0)
        if self.line_repeats == 1:
            raise ValueError("`line_repeats` must be 0 (off) or an int >= 2, got 1")
        _validation.positive_int(self.min_line_tokens, "min_line_tokens")
        _validation.positive_int(self.window_lines, "window_lines", minimum=2)
        _validation.positive_int(self.max_rewinds, "max_rewinds", minimum=0)
        _validation.positive_int(self.symbol_loop_tokens, "symbol_loop_tokens")


def _phrases(value: object, name: str) -> Any:
    if value is None or value in ("default", "chat"):
        return value
    accepted = f"`{name}` must be None, 'default', 'chat' or a non-empty list of strings / compiled regexes"
    if isinstance(value, (str, bytes, re.Pattern)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{accepted}, got {value!r}")
    return _validation.phrases(value, name)


@dataclass(frozen=True)
class BackstepConfig:
    """Settings of backstep generation (Methods 3 and 4), passed as ``model.generate(..., backstep=...)``.

    Args:
        n_remove (`int`, defaults to 10): generated tokens removed when a row samples EOS (or completes an
            ending phrase).
        schedule (`Schedule`, *optional*): temperature multiplier after each rewind, by steps since the rewind
            (the first regenerated token is step 0). ``None`` is Method 3; ``LinearDecay(2.0, n_remove)`` is
            the blog's Method 4 (see :meth:`dynamic`).
        max_backsteps (`int`, defaults to 50): EOS rewinds allowed per row; bounds the extra work.
        on_exhausted (`str`, defaults to `"suppress"`): what a row does with EOS once its rewinds are spent:
            ``"suppress"`` masks EOS like Method 1 (the row writes until ``max_new_tokens``), ``"stop"`` lets
            the row end at its next EOS.
        ban_rewound_token (`bool`, *optional*): forbid, at the rewind point, the token that began the removed
            span, so the row must take another path. ``None`` (default) bans under greedy decoding, where a
            plain rewind would regenerate the same tokens, and does not ban when sampling (the blog's rule).
        hold_back (`int`, *optional*): how many of a row's newest tokens stay revisable. Older tokens are final:
            streamed and never removed. Defaults to ``2 * n_remove`` (two rewinds can stack).
        logits_buffer (`int`, *optional*): positions of raw logits kept per row so that a rewind needs no
            forward pass. Defaults to ``n_remove + 1``; a rewind deeper than the buffer re-feeds one token. A run
            allocates at most ``max_new_tokens + 1`` positions, whatever the value.
        end_phrases (`"default"`, `"chat"` or `list[str | re.Pattern]`, *optional*): *endings* written as text
            -- a spelled end marker (``<|end_story|>``, ``<|im_end|>``), "The End", a chat closing ("I hope
            this helps"). A completed ending is handled like a sampled EOS: the row is cut back ``n_remove``
            tokens before where the phrase began, the phrase's first token is forbidden at its start, EOS is
            forbidden at the rewind point and the schedule starts. ``"default"`` is
            :func:`~perpetual_logits.default_end_phrases` of the tokenizer; ``"chat"`` adds the end-of-turn
            and turn-opening markers of every well-known chat template and the closings assistants write
            (``default_end_phrases(..., chat=True)``).
        ban_phrases (`"default"` or `list[str | re.Pattern]`, *optional*): words that must not appear, wherever
            they are (not endings): the row is cut back to the token where the phrase began and that token is
            forbidden there. For endings prefer ``end_phrases``: banning an ending at its start forces the model,
            which has finished, to go on at that very point (measured: words glued to the full stop, and less
            coherent text; see the README).
        max_phrase_rewinds (`int`, defaults to 200): rewinds allowed per row for ``end_phrases``, and as many
            again for ``ban_phrases`` (a budget each); afterwards phrases are kept.
        early_trigger (`EarlyTrigger`, *optional*): start the ``schedule`` before EOS is sampled, when a row's
            EOS probability (averaged over a window) or its entropy trend says an ending is near. Needs a
            ``schedule``.
        loops (`LoopDetection`, *optional*): rewind rows that fall into a repetition loop.
        widen (`Widening`, *optional*): after each rewind, sample with wider top-k / top-p / min-p that return to
            the configured values with the schedule (``widen.schedule`` or ``schedule``); the loop replaces
            ``generate()``'s top-k/top-p/min-p warpers by per-row ones. Needs a ``schedule`` and sampling.
        window (`ContextShift`, *optional*): write on past the model's context window: a row that reaches it
            keeps its head and its recent tokens, drops the middle from its cache and goes on (the returned
            sequence keeps every token). Without it, a run longer than the window is warned about.
        rules (`list[RewindRule]`, *optional*): your own reasons to rewind (see
            :class:`~perpetual_logits.RewindRule`); each ``generate()`` call works on its own copy
            (``RewindRule.fresh()``, a deep copy unless the rule overrides it).
        max_rule_rewinds (`int`, defaults to 50): rewinds each of ``rules`` may ask for per row (a budget per
            rule); afterwards its requests are ignored.
        min_tokens (`int`, defaults to 0): the length mode, in tokens: before a row has this many new tokens,
            EOS and endings are rewound as usual; from then on the model's own EOS after a complete sentence
            (or line) is accepted and the row finishes there (an EOS mid-sentence is still rewound). 0: no minimum.
        min_words (`int`, defaults to 0): the length mode, in words of the decoded text (CJK characters and
            runs of Latin letters, as LongBench-Write counts them); with ``min_tokens`` both must be reached.
        accept_end_phrases (`bool`, defaults to `False`): in the length mode, a completed ending phrase (see
            ``end_phrases``) after the minimum also finishes the row, the phrase kept. Needs a minimum.
        landing (`Landing` or `bool`, *optional*): end before ``max_new_tokens`` at a natural boundary (see
            :class:`~perpetual_logits.Landing`): EOS favoured after sentence ends from a margin before the limit
            (and from the minimum on; in the length mode never before it), and a row that reaches the limit cut
            back to its last complete sentence.
            ``None`` (default): on in the length mode, off otherwise; ``True``: ``Landing()``; ``False``: off.
            In every mode a row that reaches the limit drops an unfinished held-back phrase (part of a spelled
            end marker such as ``<|end_story``) from its end.

    ``end_phrases``, ``ban_phrases`` and line-level loop checks read text: pass ``generate(...,
    tokenizer=tokenizer)`` or give the tokenizer once to :func:`~perpetual_logits.make_perpetual`.

    Example:

    ```python
    >>> from perpetual_logits import BackstepConfig, LinearDecay
    >>> BackstepConfig(n_remove=5).hold_back, BackstepConfig(n_remove=5).logits_buffer
    (10, 6)
    >>> BackstepConfig.method4(n_remove=4, peak=2.0).schedule
    LinearDecay(peak=2.0, steps=4)
    >>> BackstepConfig(n_remove=0)
    Traceback (most recent call last):
    ...
    ValueError: `n_remove` must be an int >= 1, got 0

    ```
    """

    n_remove: int = 10
    schedule: Schedule | None = None
    max_backsteps: int = 50
    on_exhausted: Literal["suppress", "stop"] = "suppress"
    ban_rewound_token: bool | None = None
    hold_back: int | None = None
    logits_buffer: int | None = None
    end_phrases: Literal["default", "chat"] | PhraseList | None = None
    ban_phrases: Literal["default"] | PhraseList | None = None
    max_phrase_rewinds: int = 200
    early_trigger: EarlyTrigger | None = None
    loops: LoopDetection | None = None
    widen: Widening | None = None
    rules: Sequence[RewindRule] = ()
    max_rule_rewinds: int = 50
    window: ContextShift | None = None
    min_tokens: int = 0
    min_words: int = 0
    accept_end_phrases: bool = False
    landing: Landing | bool | None = None

    def __post_init__(self) -> None:
        _validation.positive_int(self.n_remove, "n_remove")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(
                f"`schedule` must be None or a perpetual_logits Schedule (e.g. LinearDecay(2.0, n_remove)), "
                f"got {self.schedule!r}"
            )
        _validation.positive_int(self.max_backsteps, "max_backsteps", minimum=0)
        if self.on_exhausted not in _EXHAUSTED:
            raise ValueError(f"`on_exhausted` must be 'suppress' or 'stop', got {self.on_exhausted!r}")
        if self.ban_rewound_token is not None and not isinstance(self.ban_rewound_token, bool):
            raise ValueError(f"`ban_rewound_token` must be None or a bool, got {self.ban_rewound_token!r}")
        if self.hold_back is None:
            object.__setattr__(self, "hold_back", 2 * self.n_remove)
        hold_back = _validation.positive_int(self.hold_back, "hold_back")
        if hold_back < self.n_remove:
            raise ValueError(f"`hold_back` must be >= n_remove ({self.n_remove}), got {hold_back}")
        if self.logits_buffer is None:
            object.__setattr__(self, "logits_buffer", self.n_remove + 1)
        _validation.positive_int(self.logits_buffer, "logits_buffer")
        _validation.positive_int(self.max_phrase_rewinds, "max_phrase_rewinds", minimum=0)
        object.__setattr__(self, "end_phrases", _phrases(self.end_phrases, "end_phrases"))
        object.__setattr__(self, "ban_phrases", _phrases(self.ban_phrases, "ban_phrases"))
        if self.early_trigger is not None:
            if not isinstance(self.early_trigger, EarlyTrigger):
                raise ValueError(f"`early_trigger` must be None or an EarlyTrigger, got {self.early_trigger!r}")
            if self.schedule is None:
                raise ValueError("`early_trigger` starts the temperature schedule: set `schedule` too")
        if self.widen is not None:
            if not isinstance(self.widen, Widening):
                raise ValueError(f"`widen` must be None or a Widening, got {self.widen!r}")
            if self.schedule is None:
                raise ValueError("`widen` follows the temperature schedule after a rewind: set `schedule` too")
        if self.loops is not None and not isinstance(self.loops, LoopDetection):
            raise ValueError(f"`loops` must be None or a LoopDetection, got {self.loops!r}")
        if self.window is not None and not isinstance(self.window, ContextShift):
            raise ValueError(f"`window` must be None or a ContextShift, got {self.window!r}")
        if isinstance(self.rules, RewindRule) or not isinstance(self.rules, Sequence):
            raise ValueError(f"`rules` must be a list of RewindRule instances, got {self.rules!r}")
        for rule in self.rules:
            if not isinstance(rule, RewindRule):
                raise ValueError(f"`rules` must contain RewindRule instances, got {rule!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        _validation.positive_int(self.max_rule_rewinds, "max_rule_rewinds", minimum=0)
        _validation.positive_int(self.min_tokens, "min_tokens", minimum=0)
        _validation.positive_int(self.min_words, "min_words", minimum=0)
        if not isinstance(self.accept_end_phrases, bool):
            raise ValueError(f"`accept_end_phrases` must be a bool, got {self.accept_end_phrases!r}")
        if self.accept_end_phrases and not self.length_mode:
            raise ValueError("`accept_end_phrases` accepts endings after the minimum: set `min_tokens` or `min_words`")
        if self.landing is None:
            object.__setattr__(self, "landing", Landing() if self.length_mode else False)
        elif self.landing is True:
            object.__setattr__(self, "landing", Landing())
        elif self.landing is not False and not isinstance(self.landing, Landing):
            raise ValueError(f"`landing` must be None, a bool or a Landing, got {self.landing!r}")

    @property
    def length_mode(self) -> bool:
        """Whether a minimum is set (``min_tokens`` or ``min_words``): rows end at their own EOS after it."""
        return self.min_tokens > 0 or self.min_words > 0

    @property
    def reads_text(self) -> bool:
        """Whether generation needs the tokenizer (phrases or line-level loop checks)."""
        loops_text = self.loops is not None and self.loops.line_repeats > 0
        landing = isinstance(self.landing, Landing)
        return (
            self.end_phrases is not None or self.ban_phrases is not None or loops_text or landing or self.min_words > 0
        )

    @classmethod
    def method4(cls, n_remove: int = 10, peak: float = 2.0, **kwargs: Any) -> BackstepConfig:
        """Method 4 as in the blog: ``peak`` right after the rewind, linearly back to 1.0 where EOS was."""
        return cls(n_remove=n_remove, schedule=LinearDecay(peak, n_remove), **kwargs)

    @classmethod
    def dynamic(cls, n_remove: int = 10, peak: float = 2.0, **kwargs: Any) -> BackstepConfig:
        """Deprecated: the old name of :meth:`method4` (removed in the next release)."""
        warnings.warn(
            "`BackstepConfig.dynamic` was renamed `BackstepConfig.method4`; use the new name "
            "(the old one will be removed in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return cls.method4(n_remove=n_remove, peak=peak, **kwargs)

    @classmethod
    def chat(cls, n_remove: int = 12, peak: float = 1.6, **kwargs: Any) -> BackstepConfig:
        """The preset for chat models: Method 4 + endings rewound like EOS (spelled end-of-turn markers and the
        closings assistants write, see :func:`~perpetual_logits.default_end_phrases`) + loop rewinds + the
        landing before ``max_new_tokens``. Give a minimum (``min_words=300`` for "write 300 words", or
        ``min_tokens``) and the answer ends at the model's own end of turn once it is reached.

        It is named after its audience on purpose: what it adds to :meth:`method4` is specific to chat models --
        the chat closing phrases (:data:`~perpetual_logits.CHAT_CLOSING_PHRASES`) and the chat end tokens
        (:data:`~perpetual_logits.CHAT_END_TOKENS`) of ``end_phrases="chat"``.

        Needs the tokenizer (``generate(..., tokenizer=...)`` or ``make_perpetual(model, tokenizer=...)``).
        """
        kwargs.setdefault("end_phrases", "chat")
        kwargs.setdefault("loops", LoopDetection())
        kwargs.setdefault("landing", True)
        return cls.method4(n_remove=n_remove, peak=peak, **kwargs)
