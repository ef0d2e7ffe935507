"""The one protocol of the backstep loop: every unit that keeps per-row state follows a row's rewinds.

A row's *length* counts its tokens, prompt included (left padding included, as in ``input_ids``). The loop
calls :meth:`RowState.start` once per ``generate()`` call, :meth:`RowState.rewind` whenever a row is cut back,
and :meth:`RowState.finish` when a row is done. Units are found with ``isinstance``: a user processor that
derives from :class:`RowState` is told about rewinds too.

A :class:`RewindRule` decides *whether* to rewind: after each new token of a row it returns ``None`` (keep) or
a :class:`RewindTo` (cut back to a position, forbid tokens there, restart the temperature schedule). The loop's
own reasons -- a sampled EOS, a completed ending phrase, a banned phrase, a repetition loop -- are such rules,
and users can write their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._moved import old_names

if not TYPE_CHECKING:  # the old name, for one release
    __getattr__ = old_names(__name__, {"Rewind": (__name__, "RewindTo")})

__all__ = ["PerCallState", "RewindRule", "RewindTo", "RowState", "RowView"]


class RowState(ABC):
    """A unit that keeps per-row state and follows rewinds."""

    @abstractmethod
    def start(self, batch_size: int, prompt_length: int) -> None:
        """A new generation of ``batch_size`` rows, each ``prompt_length`` tokens long, begins."""

    @abstractmethod
    def rewind(self, row: int, length: int) -> None:
        """Row ``row`` was cut back to ``length`` tokens; its next token is chosen for position ``length``."""

    def finish(self, row: int) -> None:  # noqa: B027 - most units have nothing to do here
        """Row ``row`` is done: no further token is chosen for it."""


class PerCallState(ABC):
    """A logits processor whose records belong to one ``generate()`` call.

    A processor is often built once and passed to many calls; a :func:`~perpetual_logits.make_perpetual` model
    calls :meth:`reset` on every processor of this kind at the start of each call (backstep or not), so that no
    call starts with the previous call's records.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget everything: the next call starts a new generation."""


@dataclass(frozen=True)
class RowView:
    """What a :class:`RewindRule` sees of a row right after a token was appended.

    Attributes:
        row: the batch row.
        ids: the row's tokens, prompt included; ``ids[-1]`` is the new token.
        prompt_length: how many of ``ids`` are the prompt.
        text_start: index of the row's first real token (after left padding).
        final: no token will follow (the row reached ``max_new_tokens``).
    """

    row: int
    ids: Sequence[int]
    prompt_length: int
    text_start: int
    final: bool = False


@dataclass(frozen=True)
class RewindTo:
    """A rule's request: cut the row back to ``position`` tokens and regenerate from there.

    The loop never cuts into the prompt or into tokens already final (streamed); it clamps ``position``.

    Attributes:
        position: tokens to keep (prompt included). ``len(view.ids)`` or more keeps every token: nothing is
            removed, so the request is no rewind at all (no event, no bans, no budget spent).
        ban_here: tokens forbidden at the position the row is actually cut back to (after clamping).
        ban_first_removed: also forbid there the token that stood at that position (the first removed one), so
            that the row must take another path.
        bans: tokens forbidden at given positions, ``{position: (token, ...)}``; a ban lapses once the row is
            cut back before its position.
        reason: a short name for events (``"eos"``, ``"ending"``, ``"phrase"``, ``"loop"``, ...).
        detail: what triggered it (the phrase, the repeated text), for events.
        restart_schedule: start the temperature schedule at the rewind point (Method 4).
    """

    position: int
    ban_here: Sequence[int] = ()
    ban_first_removed: bool = False
    bans: Mapping[int, Sequence[int]] = field(default_factory=dict)
    reason: str = "rule"
    detail: str | None = None
    restart_schedule: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.position, bool) or not isinstance(self.position, int):
            raise TypeError(f"`position` must be an int (tokens to keep, prompt included), got {self.position!r}")
        groups = [("ban_here", self.ban_here), *((f"bans[{pos!r}]", tokens) for pos, tokens in self.bans.items())]
        for name, tokens in groups:
            for token in tokens:
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise ValueError(f"`{name}` must hold token ids (ints >= 0), got {token!r}")
        for pos in self.bans:
            if isinstance(pos, bool) or not isinstance(pos, int):
                raise TypeError(f"`bans` keys must be int positions, got {pos!r}")


class RewindRule(RowState):
    """Decides, after every new token of a row, whether to keep it or to rewind.

    Subclasses implement :meth:`check`; rules with per-row state also follow :meth:`rewind`. :meth:`held`
    tells the streamer how many trailing tokens may still be taken back by this rule.
    """

    reason: str = "rule"

    def start(self, batch_size: int, prompt_length: int) -> None:
        """Stateless by default."""

    def rewind(self, row: int, length: int) -> None:
        """Stateless by default."""

    @abstractmethod
    def check(self, view: RowView) -> RewindTo | None:
        """Return ``None`` to keep the new token, or a :class:`RewindTo`."""

    def held(self, row: int) -> int:
        """Trailing tokens of ``row`` this rule may still take back (kept from the streamer)."""
        return 0

    def fresh(self) -> RewindRule:
        """The copy one generation works on (``generate()`` calls this once per call, so that concurrent calls
        never share per-row state). Defaults to a deep copy; override it when the rule holds something that
        cannot or must not be copied (a lock, a client, a large table) -- e.g. return a new instance that
        shares it."""
        import copy

        try:
            return copy.deepcopy(self)
        except TypeError as exc:
            raise TypeError(
                f"{type(self).__name__} cannot be deep-copied ({exc}); each generation works on its own copy of "
                "a rule: override `fresh()` to return a new instance that shares what cannot be copied"
            ) from exc
