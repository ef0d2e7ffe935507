"""Methods 3 and 4: backstep generation with an exact KV-cache rewind, as a package of small units.

When a row samples EOS (or completes an ending phrase, or falls into a loop) the loop cuts that row back,
rewinds its part of the KV cache and continues from the shorter sequence (Method 3); with a ``schedule`` the row
samples hotter right after the rewind and cools back by where it ended (Method 4).

Where things are:

* :mod:`.loop` -- the recipe (``BackstepLoop.run``) and the one place a rewind happens (``BackstepLoop.rewind``);
* :mod:`.prefill` -- the prompt forward, run when the loop is built, and what it leaves: the first logits, the
  cache layout, the decode step, the context shift;
* :mod:`.policy` -- whether, where and how a row rewinds (rules, budgets, clamp, bans, schedule restarts,
  hold-back, events): the backend-neutral :class:`~.policy.RewindPolicy` the loop and the vLLM driver both ask;
* :mod:`.rules` -- why a row rewinds (EOS, phrases, loops); :class:`~perpetual_logits.RewindRule` for your own;
* the units, each owning one piece of per-row state and following rewinds with ``rewind(row, length)``
  (:class:`~perpetual_logits.RowState`): :mod:`.rows` (tokens), :mod:`.cache` (the cache layout, no holes),
  :mod:`.buffer` (raw logits, so a rewind needs no forward), :mod:`.bans` (kept by the policy),
  :mod:`.temperature` (Method 4's schedule, with the early trigger of :mod:`perpetual_logits.triggers`),
  :mod:`.records` (output scores/logits), :mod:`.window` (the context shift past the model's window),
  :mod:`.landing` (the length mode's minimum, the landing before ``max_new_tokens``);
  :mod:`.streaming` hands the streamer what the policy made final (no per-row state of its own);
* :mod:`.config`, :mod:`.events`; the edits of ``generate()``'s processor list (length-dependent processors
  judged per row, the temperature's place, the truncation take-over) are :mod:`perpetual_logits.processor_list`.
"""

from typing import TYPE_CHECKING

from .._moved import old_names
from .cache import check_cache
from .config import BackstepConfig, LoopDetection
from .events import BackstepOutput, BackstepStats, RewindEvent
from .landing import Landing
from .loop import BackstepLoop

if not TYPE_CHECKING:  # the old names, for one release
    __getattr__ = old_names(
        __name__,
        {"BackstepEvent": (__name__, "RewindEvent"), "LoopRewinds": (__name__, "LoopDetection")},
    )

__all__ = [
    "BackstepConfig",
    "BackstepLoop",
    "BackstepOutput",
    "BackstepStats",
    "Landing",
    "LoopDetection",
    "RewindEvent",
    "check_cache",
]
