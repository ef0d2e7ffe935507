"""perpetual_logits: keep transformers models writing past the point where they learned to stop.

Methods 1 and 2 are ``LogitsProcessor``s; Methods 3 and 4 (backstep generation with KV-cache rewind) live in
:class:`PerpetualGenerationMixin`, attached to a loaded model with :func:`make_perpetual`.
"""

from ._compat import check_transformers_version

check_transformers_version()

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
    "Constant",
    "CosineDecay",
    "EOSLogitsProcessor",
    "ExponentialDecay",
    "LinearDecay",
    "PostEOSResamplingLogitsProcessor",
    "Schedule",
    "StepDecay",
    "SuppressEOSLogitsProcessor",
    "__version__",
]
