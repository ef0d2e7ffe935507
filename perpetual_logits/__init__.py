"""perpetual_logits: keep transformers models writing past the point where they learned to stop.

Methods 1 and 2 are ``LogitsProcessor``s; Methods 3 and 4 (backstep generation with KV-cache rewind) live in
:class:`PerpetualGenerationMixin`, attached to a loaded model with :func:`make_perpetual`.
"""

from ._compat import check_transformers_version

check_transformers_version()

from .backstep import BackstepConfig, BackstepEvent, BackstepOutput, BackstepStats  # noqa: E402
from .mixin import PerpetualGenerationMixin, make_perpetual  # noqa: E402
from .processors import (  # noqa: E402
    EOSLogitsProcessor,
    PostEOSResamplingLogitsProcessor,
    SuppressEOSLogitsProcessor,
)
from .schedules import (  # noqa: E402
    Constant,
    CosineDecay,
    ExponentialDecay,
    LinearDecay,
    Schedule,
    StepDecay,
)

__version__ = "0.1.0"

__all__ = [
    "BackstepConfig",
    "BackstepEvent",
    "BackstepOutput",
    "BackstepStats",
    "Constant",
    "CosineDecay",
    "EOSLogitsProcessor",
    "ExponentialDecay",
    "LinearDecay",
    "PerpetualGenerationMixin",
    "PostEOSResamplingLogitsProcessor",
    "Schedule",
    "StepDecay",
    "SuppressEOSLogitsProcessor",
    "__version__",
    "make_perpetual",
]
