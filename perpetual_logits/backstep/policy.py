"""The rewind policy: why, where and how a row rewinds -- the same on every backend.

The HF loop (:mod:`.loop`) and the vLLM driver (:mod:`perpetual_logits.vllm.driver`) keep the tensors, the cache
and the engine plumbing; after each new token of a row they ask :class:`RewindPolicy`, which answers *keep*,
*finish* or a :class:`RewindPlan` (cut the row back to a position, forbid tokens there, restart the schedule).
The policy owns, per row: the rules (EOS, ending and banned phrases, loops, the user's ``RewindRule``\\ s) and
their budgets, the clamp (never into the prompt nor into final tokens), the tokens forbidden where and for how
long (:class:`~perpetual_logits.backstep.bans.Bans`), where the temperature schedule last restarted, hold-back
(which tokens are final), and the events.

Settled between the backends (they used to differ):

* every rule has its own per-row budget: ``max_backsteps`` (EOS), ``max_phrase_rewinds`` for the endings and,
  separately, for the banned phrases, ``LoopDetection.max_rewinds``, ``max_rule_rewinds`` per user rule;
* a rewind forbids exactly what its rule asks: EOS is forbidden at the rewind point of an EOS or ending rewind
  (the text had finished there), not after a banned phrase, a loop or a user rule -- an EOS sampled there is a
  plain EOS, handled by the EOS rule with its budget and ``on_exhausted``;
* :class:`~perpetual_logits.RewindEvent` fields mean one thing each (see its docstring).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..protocol import RewindRule, RewindTo, RowState, RowView
from ..text.boundaries import cut_point, sentence_end_token_ids
from ..text.endings import default_end_phrases
from ..text.matcher import PhraseMatcher
from ..text.repetition import newline_token_ids, word_token_ids
from .bans import Bans
from .config import BackstepConfig
from .events import RewindEvent
from .landing import Landing, RowText
from .rules import EOSRule, LoopRule, PhraseRule

__all__ = ["Decision", "RewindPlan", "RewindPolicy"]


@dataclass(frozen=True)
class RewindPlan:
    """What the policy decided for a row: cut it back to ``position`` tokens (prompt included).

    Attributes:
        row: the row.
        position: tokens kept, prompt included; already clamped (never into the prompt or final tokens) and
            always below the row's length, so the newest token -- the one that triggered the rewind -- goes.
        removed: tokens removed besides that newest one (it is refused before ever being fed).
        bans: ``{position: tokens}`` forbidden from now on at positions ``>= position``.
        banned_token: the token forbidden at ``position`` because it began the removed span, or ``None``.
        restart_schedule: start the temperature schedule at ``position``.
        reason: why (the rule's reason).
        detail: what triggered it (a phrase, the repeated text).
    """

    row: int
    position: int
    removed: int
    bans: dict[int, frozenset[int]]
    banned_token: int | None
    restart_schedule: bool
    reason: str
    detail: str | None


#: What :meth:`RewindPolicy.after_token` returns: keep the token, finish the row (an EOS it keeps, or its last
#: token), or a :class:`RewindPlan`.
Decision = Literal["keep", "finish"] | RewindPlan


class RewindPolicy(RowState):
    """The rules of one generation and their per-row state, asked after each new token of a row.

    A backend calls :meth:`start` (or :meth:`start_rows` when prompts differ in length), then per new token
    :meth:`after_token`; on a :class:`RewindPlan` it cuts its own state back and calls :meth:`apply`, which
    rewinds the rules, lapses and adds bans, records the schedule restart and the event. :meth:`settle` says
    which tokens became final (hold-back); :meth:`finish` ends a row.

    Args:
        config: the backstep settings.
        eos: the ids that end a row (ids outside the vocabulary are dropped: they can never be sampled).
        vocab_size: the model's vocabulary size (rules' bans are checked against it).
        tokenizer: reads text for phrases and line loops (required when the config reads text).
        greedy: whether rows decode greedily (the default of ``ban_rewound_token``); one bool for all rows.

    Example:

    ```python
    >>> from perpetual_logits import BackstepConfig
    >>> from perpetual_logits.protocol import RowView
    >>> policy = RewindPolicy(BackstepConfig(n_remove=2, max_backsteps=1), eos=[2], vocab_size=10)
    >>> policy.start(batch_size=1, prompt_length=3)
    >>> ids = [5, 5, 5, 7, 8, 9]
    >>> policy.after_token(RowView(0, ids, 3, 0))
    'keep'
    >>> plan = policy.after_token(RowView(0, [*ids, 2], 3, 0))  # EOS: cut back 2 tokens before it
    >>> plan.position, plan.removed, sorted(plan.bans[plan.position])
    (4, 2, [2])
    >>> policy.apply(plan, step=3, eos_prob=0.5).position  # generated tokens kept
    1
    >>> policy.after_token(RowView(0, [5, 5, 5, 7, 2], 3, 0))  # budget spent: EOS now ends the row
    'finish'

    ```
    """

    def __init__(
        self,
        config: BackstepConfig,
        eos: Sequence[int],
        vocab_size: int,
        tokenizer: Any = None,
        greedy: bool = False,
    ) -> None:
        if not isinstance(config, BackstepConfig):
            raise TypeError(f"`config` must be a BackstepConfig, got {type(config).__name__}")
        # -- settings
        self.config = config
        self.vocab_size = int(vocab_size)
        self.eos = frozenset(int(e) for e in eos if 0 <= int(e) < self.vocab_size)
        self.hold_back = int(config.hold_back)  # type: ignore[arg-type]
        self.suppress_when_exhausted = config.on_exhausted == "suppress"
        # -- rules, each with its per-row budget (index 0 is the EOS rule)
        eos_sorted = tuple(sorted(self.eos))
        self.eos_rule = EOSRule(eos_sorted, config.n_remove, self._ban_rewound(greedy))
        self.rules: list[RewindRule] = [self.eos_rule]
        self.limits: list[int] = [config.max_backsteps]
        for rule in _phrase_rules(config, tokenizer, eos_sorted):
            self.rules.append(rule)
            self.limits.append(config.max_phrase_rewinds)
        if config.loops is not None:
            lines = config.loops.line_repeats > 0 and tokenizer is not None
            words = _word_ids(tokenizer) if tokenizer is not None else None
            self.rules.append(LoopRule(config.loops, _newline_ids(tokenizer) if lines else None, words))
            self.limits.append(config.loops.max_rewinds)
        for rule in config.rules:
            self.rules.append(rule.fresh())
            self.limits.append(config.max_rule_rewinds)
        # -- the length mode and the landing: what each row's text says (its minimum, its sentence ends)
        landing = config.landing if isinstance(config.landing, Landing) else None
        self.text = (
            RowText(tokenizer, config.min_tokens, config.min_words, landing)
            if landing is not None or config.length_mode
            else None
        )
        # Rules that can hold tokens back from the streamer (the others always hold none), and with them the
        # landing's text (it may cut back to the last sentence end): asked every step.
        self.held_by: list[RowText | RewindRule] = [
            *([self.text] if self.text is not None and self.text.landing is not None else []),
            *(rule for rule in self.rules if type(rule).held is not RewindRule.held),
        ]
        # -- per-row state: prompt lengths, budgets spent, bans, schedule restarts, final tokens, events
        self.prompt_lengths: list[int] = []
        self.used: list[list[int]] = []
        self.bans = Bans()
        self.schedule_from: list[int | None] = []
        self.final: list[int] = []
        self.events: list[list[RewindEvent]] = []

    def _ban_rewound(self, greedy: bool) -> bool:
        """``ban_rewound_token``, whose default is to ban under greedy decoding (a plain rewind would regenerate
        the same tokens) and not when sampling (the blog's rule)."""
        configured = self.config.ban_rewound_token
        return bool(greedy) if configured is None else configured

    # -- protocol ------------------------------------------------------------------------------------------
    def start(self, batch_size: int, prompt_length: int) -> None:
        self.start_rows([prompt_length] * batch_size)

    def start_rows(self, prompt_lengths: Sequence[int], greedy: Sequence[bool] | None = None) -> None:
        """Start a generation whose rows have prompts of these lengths (vLLM: each its own). Rules are started
        with the shortest; each check's :class:`~perpetual_logits.protocol.RowView` carries the row's own.

        Args:
            prompt_lengths: per row.
            greedy: per row, whether it decodes greedily (vLLM: each request its own temperature); decides
                ``ban_rewound_token``'s default per row.
        """
        batch = len(prompt_lengths)
        self.prompt_lengths = [int(n) for n in prompt_lengths]
        self.used = [[0] * batch for _ in self.rules]
        self.bans.start(batch, min(self.prompt_lengths, default=0))
        self.schedule_from = [None] * batch
        self.final = list(self.prompt_lengths)
        self.events = [[] for _ in range(batch)]
        for rule in self.rules:
            rule.start(batch, min(self.prompt_lengths, default=0))
        if self.text is not None:
            self.text.start_rows(self.prompt_lengths)
        if greedy is not None:
            if len(greedy) != batch:
                raise ValueError(f"`greedy` must hold one bool per row ({batch}), got {len(greedy)}")
            self.eos_rule.ban_rows = [self._ban_rewound(g) for g in greedy]
        if self.config.max_backsteps == 0 and self.suppress_when_exhausted:
            for row in range(batch):
                self.bans.forbid_always(row, self.eos)

    def rewind(self, row: int, length: int) -> None:
        """Cut ``row`` back to ``length`` tokens: rules follow, bans of later positions lapse."""
        for rule in self.rules:
            rule.rewind(row, length)
        self.bans.rewind(row, length)
        if self.text is not None:
            self.text.rewind(row, length)

    def finish(self, row: int) -> None:
        for rule in self.rules:
            rule.finish(row)

    # -- deciding ------------------------------------------------------------------------------------------
    def after_token(self, view: RowView, floor: int = 0) -> Decision:
        """Decide about the newest token of ``view.row`` (``view.ids[-1]``).

        Rules are asked in order (EOS first, then endings, banned phrases, loops, user rules); the first that
        asks for a rewind within its budget wins. Otherwise the row finishes at an EOS (once the EOS budget is
        spent) or at its last token (``view.final``), and keeps going else.

        Args:
            view: the row right after the token was appended.
            floor: the fewest tokens a rewind may keep besides the prompt and the final tokens (the HF loop
                passes 1 for a prompt given as ``inputs_embeds`` whose first logits are gone, and the context shift's
                floor).
        """
        row = view.row
        text = self.text
        if text is not None:
            if text.observe(view):
                self.bans.always[row].difference_update(self.eos)  # the minimum lifts an exhausted EOS budget
            if view.ids[-1] in self.eos and text.accepts_end(row):
                return "finish"  # the length mode's minimum is reached, or the row lands at a sentence end
        for index, rule in enumerate(self.rules):
            request = rule.check(view)
            if request is None or self.used[index][row] >= self.limits[index]:
                continue
            if request.reason == "ending" and self.config.accept_end_phrases and text and text.minimum_reached(row):
                continue  # the length mode keeps the model's own ending once the minimum is reached
            plan = self._plan(view, request, floor, rule)
            if plan is None:
                continue
            spent = self.used[index]
            spent[row] += 1
            if index == 0 and spent[row] == self.limits[0] and self.suppress_when_exhausted:
                self.bans.forbid_always(row, self.eos)
            return plan
        return "finish" if view.ids[-1] in self.eos or view.final else "keep"

    def _plan(self, view: RowView, request: RewindTo, floor: int, rule: RewindRule) -> RewindPlan | None:
        """The clamped rewind for ``request``, or ``None`` when it would remove nothing."""
        ids, row = view.ids, view.row
        length = len(ids)
        if request.position >= length:
            return None  # "keep this many tokens" = all of them: nothing to regenerate
        low = max(self.final[row], self.prompt_lengths[row], view.prompt_length, floor)
        position = min(max(request.position, low), length - 1)
        here = {int(t) for t in request.ban_here}
        banned: int | None = None
        if request.ban_first_removed and ids[position] not in here:
            banned = ids[position]
            here.add(banned)
        bans = {position: here}
        for pos, tokens in request.bans.items():
            if pos >= position:
                bans.setdefault(pos, set()).update(int(t) for t in tokens)
        for forbidden in bans.values():
            bad = [t for t in forbidden if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"{type(rule).__name__} asked to forbid token ids {sorted(bad)}: `ban_here` and `bans` take ids "
                    f"in [0, {self.vocab_size}) (the vocabulary)"
                )
        return RewindPlan(
            row=row,
            position=position,
            removed=length - 1 - position,
            bans={pos: frozenset(tokens) for pos, tokens in bans.items() if tokens},
            banned_token=banned,
            restart_schedule=request.restart_schedule,
            reason=request.reason,
            detail=request.detail,
        )

    # -- applying --------------------------------------------------------------------------------------------
    def apply(self, plan: RewindPlan, step: int, eos_prob: float, deep: bool = False) -> RewindEvent:
        """Carry out ``plan`` on the policy's own state (rules, bans, schedule restart) and record its event.

        Args:
            plan: from :meth:`after_token`.
            step: the backend's step counter for the event.
            eos_prob: the raw probability of the EOS ids in the distribution the triggering token was drawn
                from (NaN where the backend cannot see it).
            deep: the backend re-fed a token to get the logits at ``plan.position``.
        """
        row, position = plan.row, plan.position
        self.rewind(row, position)
        for pos, tokens in plan.bans.items():
            self.bans.add(row, pos, tokens)
        if plan.restart_schedule:
            self.schedule_from[row] = position
        event = RewindEvent(
            step=step,
            position=position - self.prompt_lengths[row],
            removed=plan.removed,
            eos_prob=eos_prob,
            deep=deep,
            banned_token=plan.banned_token,
            reason=plan.reason,
            detail=plan.detail,
        )
        self.events[row].append(event)
        return event

    # -- hold-back ---------------------------------------------------------------------------------------------
    def held(self, row: int) -> int:
        """Trailing tokens of ``row`` that must stay revisable: ``hold_back``, or more while a rule needs it (or
        the landing, which may cut back to the last sentence end)."""
        held = self.hold_back
        for unit in self.held_by:
            n = unit.held(row)
            if n > held:
                held = n
        return held

    # -- the limit -------------------------------------------------------------------------------------------
    def set_limits(self, max_lengths: Sequence[int | None]) -> None:
        """Per row, the most tokens it may hold, prompt included (where the landing aims)."""
        if self.text is not None:
            self.text.set_limits(max_lengths)

    def landing_bonus(self, row: int) -> tuple[int, int, float] | None:
        """Where the landing's EOS bonus starts for ``row`` (a length, prompt included), the tokens it rises over
        and its full strength; ``None``: no landing, or not due yet (the length mode before the minimum)."""
        text = self.text
        if text is None or text.landing is None:
            return None
        due = text.due(row)
        if due is None:
            return None
        return due, text.margin(row) or text.landing.margin, float(text.landing.strength)

    def sentence_end_ids(self) -> frozenset[int]:
        """The tokenizer's tokens whose own text ends a sentence or line (computed once per tokenizer)."""
        if self.text is None or self.text.tokenizer is None:
            return frozenset()
        return _vocab_set(self.text.tokenizer, "sentence ends", sentence_end_token_ids)

    def cut_at_limit(self, view: RowView) -> tuple[int, list[int]]:
        """Where a row that reached its token limit (not at an EOS) ends: in every mode without an unfinished
        held-back phrase (part of a spelled end marker); with the landing's ``cut_back``, at its last complete
        sentence or line (else its last whole word; see :func:`~perpetual_logits.text.boundaries.cut_point`). Never
        below its final tokens.

        Returns:
            `tuple[int, list[int]]`: the length to keep (prompt included) and tokens to append after it (the
            head of a token that held a sentence end, spelled anew; usually none).
        """
        row, ids = view.row, view.ids
        length = len(ids)
        prompt = max(self.prompt_lengths[row], view.prompt_length)
        floor = max(self.final[row], prompt)
        partial = max((rule.partial(row) for rule in self.rules if isinstance(rule, PhraseRule)), default=0)
        cut = max(length - partial, floor)
        text = self.text
        if text is not None and text.landing is not None and text.landing.cut_back:
            return cut_point(text.tokenizer, ids[:cut], floor, prompt, ends=text.boundaries[row])
        return cut, []

    def settle(self, row: int, length: int, finished: bool) -> tuple[int, int]:
        """Make final what is far enough behind the end of ``row`` (all of it once finished).

        Returns:
            `tuple[int, int]`: the final token count before and after (prompt included): stream what is between.
        """
        before = self.final[row]
        target = length if finished else max(before, length - self.held(row))
        self.final[row] = target
        return before, target

    def eos_suppressed(self, row: int) -> bool:
        """EOS is forbidden at every position of ``row`` (its budget is spent and ``on_exhausted="suppress"``)."""
        return bool(self.eos) and self.eos <= self.bans.always[row]


# -- construction helpers ----------------------------------------------------------------------------------
def _phrase_rules(config: BackstepConfig, tokenizer: Any, eos: Sequence[int]) -> list[RewindRule]:
    wanted = [(config.end_phrases, "ending", "end_phrases"), (config.ban_phrases, "ban", "ban_phrases")]
    rules: list[RewindRule] = []
    for phrases, mode, name in wanted:
        if phrases is None:
            continue
        if tokenizer is None:
            raise ValueError(
                f"`{name}` needs the tokenizer to read the text: call generate(..., tokenizer=tokenizer) or "
                "make_perpetual(model, tokenizer=tokenizer)"
            )
        if phrases in ("default", "chat"):
            # No EOS id inside the vocabulary (a model whose EOS can never be sampled): the tokenizer's own
            # end markers are still endings.
            listed = default_end_phrases(tokenizer, list(eos) or None, chat=phrases == "chat")
        else:
            listed = list(phrases)
        matcher = _matcher(listed, tokenizer)
        rules.append(PhraseRule(matcher, mode, config.n_remove, config.max_phrase_rewinds, eos))
    return rules


# Compiled phrase matchers per tokenizer and phrase list: a matcher is read-only once built (each row keeps its
# own matching state), and building one for thousands of phrases takes a noticeable time that every generate()
# call and every served request with the same settings would otherwise pay again.
_MATCHERS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], PhraseMatcher]] = weakref.WeakKeyDictionary()
_MATCHERS_PER_TOKENIZER = 8


def _matcher(phrases: list[Any], tokenizer: Any) -> PhraseMatcher:
    """The matcher of ``phrases`` for ``tokenizer``, built once and reused (the last few phrase lists)."""
    key = tuple(phrases)
    try:
        cached = _MATCHERS.setdefault(tokenizer, {})
        found = cached.get(key)
    except TypeError:  # an unhashable phrase or a tokenizer without weak references: build it every time
        return PhraseMatcher(phrases, tokenizer)
    if found is None:
        found = PhraseMatcher(phrases, tokenizer)
        if len(cached) >= _MATCHERS_PER_TOKENIZER:
            cached.pop(next(iter(cached)))  # the oldest
        cached[key] = found
    return found


# Token-id sets that decode the whole vocabulary, computed once per tokenizer and kind.
_VOCAB_SETS: weakref.WeakKeyDictionary[Any, dict[str, frozenset[int]]] = weakref.WeakKeyDictionary()


def _vocab_set(tokenizer: Any, kind: str, compute: Callable[[Any], frozenset[int]]) -> frozenset[int]:
    try:
        known = _VOCAB_SETS[tokenizer]
    except KeyError:
        known = {}
        _VOCAB_SETS[tokenizer] = known
    except TypeError:  # a tokenizer that cannot be weakly referenced: computed each time
        return compute(tokenizer)
    if kind not in known:
        known[kind] = compute(tokenizer)
    return known[kind]


def _newline_ids(tokenizer: Any) -> frozenset[int]:
    """Line-ending token ids of a tokenizer (see :func:`~perpetual_logits.text.repetition.newline_token_ids`)."""
    return _vocab_set(tokenizer, "newlines", newline_token_ids)


def _word_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of tokens with a letter (see :func:`~perpetual_logits.text.repetition.word_token_ids`)."""
    return _vocab_set(tokenizer, "words", word_token_ids)
