"""perpetual_logits on vLLM (the optional ``vllm`` extra): Methods 1-4 and ending control when serving.

* :func:`LLM` -- a ``vllm.LLM`` with :class:`PerpetualLogitsProcessor` registered;
* Methods 1 and 2 per request: ``SamplingParams(extra_args=suppress_eos())`` / ``extra_args=resample_eos(...)``;
* Methods 3 and 4 and ending control: :func:`generate` ``(llm, prompts, params, backstep=BackstepConfig(...))``.

Importing ``perpetual_logits`` never imports this package. This package imports vLLM where it is installed
(the processor subclasses vLLM's interfaces) and still imports without it (for the docs and type checks).
"""

from typing import TYPE_CHECKING

from .._moved import old_names
from .driver import LLM, PerpetualRequestOutput, RequestStats, eos_token_ids, generate
from .processor import PerpetualLogitsProcessor, processor_for_vocabulary
from .settings import (
    EXTRA_ARGS_KEY,
    EarlySettings,
    RequestSettings,
    ScheduleTable,
    WideningSettings,
    resample_eos,
    schedule_table,
    suppress_eos,
)

if not TYPE_CHECKING:  # the old name, for one release
    __getattr__ = old_names(
        __name__, {"KEY": (__name__, "EXTRA_ARGS_KEY"), "WidenSettings": (__name__, "WideningSettings")}
    )

__all__ = [
    "EXTRA_ARGS_KEY",
    "LLM",
    "EarlySettings",
    "PerpetualLogitsProcessor",
    "PerpetualRequestOutput",
    "RequestSettings",
    "RequestStats",
    "ScheduleTable",
    "WideningSettings",
    "eos_token_ids",
    "generate",
    "processor_for_vocabulary",
    "resample_eos",
    "schedule_table",
    "suppress_eos",
]
