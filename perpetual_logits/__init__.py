"""perpetual_logits: keep transformers models writing past the point where they learned to stop.

Methods 1 and 2 are ``LogitsProcessor``s; Methods 3 and 4 (backstep generation with KV-cache rewind) live in
:class:`PerpetualGenerationMixin`, attached to a loaded model with :func:`make_perpetual`. The analysis toolkit
(:mod:`perpetual_logits.analysis`) shows why a model stops; ending control beyond the EOS token lives in
:mod:`perpetual_logits.text` (ending phrases, loops), :mod:`perpetual_logits.triggers` and
:mod:`perpetual_logits.criteria`; :mod:`perpetual_logits.app` is the command line and its runs.
"""

from typing import TYPE_CHECKING

from ._native import use_source_if_needed as _use_source_if_needed

_use_source_if_needed()  # before any compiled module is imported: the source when asked or when the build is stale

from ._compat import check_transformers_version  # noqa: E402
from ._moved import install as _install_moved_modules  # noqa: E402
from ._moved import old_names as _old_names  # noqa: E402

check_transformers_version()
_install_moved_modules()

from .analysis import StepStats, StepStatsRecorder, blockwise, eos_window, step_stats  # noqa: E402
from .analysis.plotting import plot_blockwise, plot_eos_window  # noqa: E402
from .backstep import (  # noqa: E402
    BackstepConfig,
    BackstepOutput,
    BackstepStats,
    Landing,
    LoopDetection,
    RewindEvent,
)
from .backstep.window import ContextShift  # noqa: E402
from .criteria import EventSource, EvictionBudgetCriteria, RepetitionLoopCriteria  # noqa: E402
from .dry import DRYLogitsProcessor  # noqa: E402
from .mixin import PerpetualGenerationMixin, make_perpetual  # noqa: E402
from .processors import (  # noqa: E402
    EOSLogitsProcessor,
    PostEOSResamplingLogitsProcessor,
    SuppressEOSLogitsProcessor,
)
from .protocol import PerCallState, RewindRule, RewindTo, RowState, RowView  # noqa: E402
from .schedules import (  # noqa: E402
    Constant,
    CosineDecay,
    ExponentialDecay,
    LinearDecay,
    Schedule,
    StepDecay,
)
from .text.endings import CHAT_CLOSING_PHRASES, CHAT_END_TOKENS, ENDING_PHRASES, default_end_phrases  # noqa: E402
from .text.matcher import PhraseMatch, PhraseMatcher, PhraseScan  # noqa: E402
from .text.repetition import LoopMatch, find_line_loop, find_token_loop, newline_token_ids  # noqa: E402
from .triggers import EarlyTrigger  # noqa: E402
from .truncation import (  # noqa: E402
    Truncation,
    Widening,
)

__version__ = "0.1.0"

if not TYPE_CHECKING:  # renamed public names, and internals that left the public names, for one release
    __getattr__ = _old_names(
        __name__,
        {
            "BackstepEvent": (__name__, "RewindEvent"),
            "LoopRewinds": (__name__, "LoopDetection"),
            "Rewind": (__name__, "RewindTo"),
            "Widen": (__name__, "Widening"),
            "RowTruncation": (f"{__name__}.truncation", "RowTruncation"),
            "TruncationSchedule": (f"{__name__}.truncation", "TruncationSchedule"),
            "take_over_truncation": (f"{__name__}.processor_list", "take_over_truncation"),
        },
    )

__all__ = [
    "CHAT_CLOSING_PHRASES",
    "CHAT_END_TOKENS",
    "ENDING_PHRASES",
    "BackstepConfig",
    "BackstepOutput",
    "BackstepStats",
    "Constant",
    "ContextShift",
    "CosineDecay",
    "DRYLogitsProcessor",
    "EOSLogitsProcessor",
    "EarlyTrigger",
    "EventSource",
    "EvictionBudgetCriteria",
    "ExponentialDecay",
    "Landing",
    "LinearDecay",
    "LoopDetection",
    "LoopMatch",
    "PerCallState",
    "PerpetualGenerationMixin",
    "PhraseMatch",
    "PhraseMatcher",
    "PhraseScan",
    "PostEOSResamplingLogitsProcessor",
    "RepetitionLoopCriteria",
    "RewindEvent",
    "RewindRule",
    "RewindTo",
    "RowState",
    "RowView",
    "Schedule",
    "StepDecay",
    "StepStats",
    "StepStatsRecorder",
    "SuppressEOSLogitsProcessor",
    "Truncation",
    "Widening",
    "__version__",
    "blockwise",
    "default_end_phrases",
    "eos_window",
    "find_line_loop",
    "find_token_loop",
    "make_perpetual",
    "newline_token_ids",
    "plot_blockwise",
    "plot_eos_window",
    "step_stats",
]
