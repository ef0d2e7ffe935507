"""What a backstep generation reports: one event per rewind, work counters, and the output object."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers.generation.utils import GenerateDecoderOnlyOutput

from .._moved import old_names

if not TYPE_CHECKING:  # the old name, for one release
    __getattr__ = old_names(__name__, {"BackstepEvent": (__name__, "RewindEvent")})

__all__ = ["BackstepOutput", "BackstepStats", "RewindEvent"]


@dataclass(frozen=True)
class RewindEvent:
    """One rewind of one row. Each field means the same on the HF and the vLLM backend.

    Attributes:
        step: tokens the row had sampled before the one that triggered the rewind, removed ones included (on HF
            also the decoding step, from 0, at which it happened: an active row samples one token per step).
        position: generated tokens the row kept, i.e. the generated index where regeneration starts.
        removed: tokens removed besides the newest one, which triggered the rewind and is refused (never fed);
            fewer than asked near the prompt or the final tokens; 0 means only the new token was refused.
        eos_prob: the model's raw probability of the EOS ids (before processors, temperature and bans) in the
            distribution the triggering token was drawn from, whatever the reason (HF; 0.0 for a model without
            EOS ids). vLLM returns only the sampled token's probability: for an EOS rewind this is the sampled EOS
            id's probability (the same number when the model has one EOS id, that id's share when it has several),
            and NaN for every other reason.
        deep: the logits buffer did not reach back far enough and one token was re-fed (one extra forward at
            batch size 1; always ``False`` on vLLM).
        banned_token: the token forbidden at ``position`` because it began the removed span
            (``ban_rewound_token``, a banned phrase's or a loop's first token, a rule's ``ban_first_removed``), or
            ``None`` (an ending forbids its first token where the phrase began, not at ``position``).
        reason: why: ``"eos"`` (EOS sampled), ``"ending"`` (an end phrase completed), ``"phrase"`` (a banned
            phrase completed), ``"loop"`` (a repetition loop), or a user rule's ``reason``.
        detail: what triggered it: the phrase, the repeated text.
    """

    step: int
    position: int
    removed: int
    eos_prob: float
    deep: bool = False
    banned_token: int | None = None
    reason: str = "eos"
    detail: str | None = None

    @property
    def phrase(self) -> str | None:
        """The phrase, for phrase and ending rewinds."""
        return self.detail if self.reason in ("phrase", "ending") else None


@dataclass
class BackstepStats:
    """Work counters of one backstep generation (used by tests and benchmarks).

    Attributes:
        prefill_forwards: prompt forwards (1).
        decode_forwards: forwards after the prompt.
        removed_tokens: tokens removed by rewinds, all rows.
        deep_rewinds: rewinds that re-fed a token because the logits buffer did not reach back.
        rewinds: rewinds, all rows and reasons.
        cache_slots: cache length (slots per row) at the end.
        peak_cache_slots: the largest cache length during the run.
        realignments: times rows' cache slots were moved (after rewinds in a batch).
        early_triggers: schedules started early by the ``early_trigger``.
        context_shifts: times a row's middle was dropped from the cache (``BackstepConfig.window``), all rows.
        landing_cuts: rows cut back at ``max_new_tokens`` (to a sentence end, or dropping an unfinished phrase);
            the tokens cut count in ``removed_tokens``.
    """

    prefill_forwards: int = 0
    decode_forwards: int = 0
    removed_tokens: int = 0
    deep_rewinds: int = 0
    rewinds: int = 0
    cache_slots: int = 0
    peak_cache_slots: int = 0
    realignments: int = 0
    early_triggers: int = 0
    context_shifts: int = 0
    landing_cuts: int = 0

    @property
    def backsteps(self) -> int:
        """Deprecated: the old name of :attr:`rewinds` (removed in the next release)."""
        warnings.warn(
            "`BackstepStats.backsteps` was renamed `BackstepStats.rewinds`; use the new name "
            "(the old one will be removed in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.rewinds


@dataclass
class BackstepOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus, per row, the backstep events and the run's work counters."""

    backstep_events: list[list[RewindEvent]] | None = None
    backstep_stats: BackstepStats | None = None
    early_triggers: list[list[int]] | None = None
