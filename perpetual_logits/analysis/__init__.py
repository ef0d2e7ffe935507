"""Why models stop: per-step statistics (:mod:`.steps`), text metrics (:mod:`.metrics`) and figures (:mod:`.plotting`).

The package hands on the names of :mod:`.steps`, so ``from perpetual_logits.analysis import StepStats`` works.
"""

from .steps import (
    StepStats,
    StepStatsRecorder,
    WindowStep,
    aligned_means,
    blockwise,
    eos_window,
    step_stats,
    token_label,
)

__all__ = [
    "StepStats",
    "StepStatsRecorder",
    "WindowStep",
    "aligned_means",
    "blockwise",
    "eos_window",
    "step_stats",
    "token_label",
]
