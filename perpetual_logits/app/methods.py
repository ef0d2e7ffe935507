"""Named methods: one name → the arguments of ``generate()``, shared by the CLI, the demo and the benchmarks.

Each entry of :data:`METHODS` says how to turn :class:`MethodSettings` (sampling and schedule settings) into
the ``generate()`` arguments of one method: a ``LogitsProcessor`` (Methods 1-2) or a ``BackstepConfig``
(Methods 3-4). Adding a method is adding one :class:`Method` to :data:`METHODS`.

Loading a model and running a method on prompts is :mod:`perpetual_logits.app.running`'s job. A bad setting
raises ``ValueError`` with a one-line message.

Example:

```python
>>> from perpetual_logits.app.methods import METHODS, MethodSettings, generation_arguments
>>> list(METHODS)
['baseline', 'suppress', 'post-eos', 'backstep', 'dynamic', 'dynamic+phrases', 'chat']
>>> plan = generation_arguments("post-eos", eos=[2], settings=MethodSettings(max_new_tokens=20, peak=1.5))
>>> type(plan.processor).__name__, plan.processor.schedule
('PostEOSResamplingLogitsProcessor', LinearDecay(peak=1.5, steps=10))
>>> MethodSettings(max_new_tokens=0)
Traceback (most recent call last):
...
ValueError: `max_new_tokens` must be an int >= 1 and <= 1000000, got 0

```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _validation
from ..schedules import MAX_MULTIPLIER, MIN_MULTIPLIER

__all__ = [
    "MAX_NEW_TOKENS",
    "MAX_SEED",
    "METHODS",
    "SCHEDULES",
    "GenerationPlan",
    "Method",
    "MethodSettings",
    "generation_arguments",
    "make_schedule",
]

SCHEDULES = ("linear", "step", "cosine", "exponential", "constant")
#: Seeds go to ``transformers.set_seed``, which seeds numpy too: numpy takes 32-bit seeds.
MAX_SEED = 2**32 - 1
#: A budget beyond any model's context; larger values are a typo, not a request.
MAX_NEW_TOKENS = 1_000_000


@dataclass(frozen=True)
class MethodSettings:
    """Sampling and method settings shared by every run of a command; validated at construction.

    Args:
        max_new_tokens (`int`): new-token budget, in [1, 1e6].
        temperature (`float`, defaults to 1.0): sampling temperature, in [1e-3, 1e3] (smaller values overflow
            float32 logits into NaN).
        top_k (`int`, defaults to 50): top-k; 0 turns it off.
        top_p (`float`, defaults to 1.0): nucleus top-p in (0, 1].
        n_remove (`int`, defaults to 10): tokens removed per backstep; also the schedule length.
        peak (`float`, defaults to 2.0): temperature multiplier right after a trigger, in [1e-3, 1e3].
        schedule (`str`, defaults to "linear"): one of :data:`SCHEDULES`.
        max_backsteps (`int`, defaults to 50): backsteps per row before the fallback (backstep methods).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    n_remove: int = 10
    peak: float = 2.0
    schedule: str = "linear"
    max_backsteps: int = 50

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "max_new_tokens", _validation.positive_int(self.max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS))
        put(self, "temperature", _multiplier(self.temperature, "temperature"))
        put(self, "top_k", _validation.positive_int(self.top_k, "top_k", minimum=0))
        put(self, "top_p", _validation.probability(self.top_p, "top_p"))
        put(self, "n_remove", _validation.positive_int(self.n_remove, "n_remove", maximum=_validation.MAX_STEPS))
        put(self, "peak", _multiplier(self.peak, "peak"))
        put(self, "schedule", _validation.choice(self.schedule, "schedule", SCHEDULES))
        put(self, "max_backsteps", _validation.positive_int(self.max_backsteps, "max_backsteps", minimum=0))


def _multiplier(value: object, name: str) -> float:
    result = _validation.positive_float(value, name, maximum=MAX_MULTIPLIER)
    if result < MIN_MULTIPLIER:
        raise ValueError(f"`{name}` must be a number in [{MIN_MULTIPLIER:g}, {MAX_MULTIPLIER:g}], got {value!r}")
    return result


def make_schedule(kind: str, peak: float, steps: int) -> Any:
    """The temperature schedule named ``kind``, ``steps`` tokens long where it has a length.

    Example:

    ```python
    >>> from perpetual_logits.app.methods import make_schedule
    >>> make_schedule("cosine", 2.0, 5)
    CosineDecay(peak=2.0, steps=5)

    ```
    """
    from .. import schedules

    kind = _validation.choice(kind, "schedule", SCHEDULES)
    if kind == "linear":
        return schedules.LinearDecay(peak, steps)
    if kind == "step":
        return schedules.StepDecay(peak)  # the reference code's 0.1 per token
    if kind == "cosine":
        return schedules.CosineDecay(peak, steps)
    if kind == "exponential":
        return schedules.ExponentialDecay(peak)
    return schedules.Constant(peak, steps=steps)


# -- the methods -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One named method: a description, what its interventions are called, and how to build it.

    Args:
        name (`str`): the name on the command line and in tables.
        description (`str`): one line for tables and ``--help``.
        intervention (`str`): what is counted per run ("none", "EOS on top", "evictions", "backsteps").
        processor (`callable`, *optional*): ``(eos ids, settings) -> LogitsProcessor`` (Methods 1-2).
        backstep (`callable`, *optional*): ``settings -> BackstepConfig`` (Methods 3-4); needs ``make_perpetual``.
        needs_tokenizer (`bool`, defaults to False): ``generate()`` must be given the tokenizer (ending phrases).
    """

    name: str
    description: str
    intervention: str = "none"
    processor: Callable[[list[int], MethodSettings], Any] | None = None
    backstep: Callable[[MethodSettings], Any] | None = None
    needs_tokenizer: bool = False


def _suppress(eos: list[int], settings: MethodSettings) -> Any:
    from ..processors import SuppressEOSLogitsProcessor

    return SuppressEOSLogitsProcessor(eos)


def _post_eos(eos: list[int], settings: MethodSettings) -> Any:
    from ..processors import PostEOSResamplingLogitsProcessor

    schedule = make_schedule(settings.schedule, settings.peak, settings.n_remove)
    return PostEOSResamplingLogitsProcessor(eos, schedule=schedule, trigger="sample")


def _backstep(dynamic: bool, phrases: bool) -> Callable[[MethodSettings], Any]:
    def build(settings: MethodSettings) -> Any:
        from ..backstep import BackstepConfig

        schedule = make_schedule(settings.schedule, settings.peak, settings.n_remove) if dynamic else None
        return BackstepConfig(
            n_remove=settings.n_remove,
            schedule=schedule,
            max_backsteps=settings.max_backsteps,
            end_phrases="default" if phrases else None,
        )

    return build


def _chat(settings: MethodSettings) -> Any:
    from ..backstep import BackstepConfig

    return BackstepConfig.chat(n_remove=settings.n_remove, peak=settings.peak, max_backsteps=settings.max_backsteps)


#: The methods by name, in the order tables show them. A new method is one more entry.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("baseline", "baseline: stops at EOS"),
        Method("suppress", "Method 1: EOS suppression", "EOS on top", processor=_suppress),
        Method("post-eos", "Method 2: post-EOS resampling", "evictions", processor=_post_eos),
        Method("backstep", "Method 3: backstep", "backsteps", backstep=_backstep(dynamic=False, phrases=False)),
        Method("dynamic", "Method 4: backstep + schedule", "backsteps", backstep=_backstep(True, False)),
        Method(
            "dynamic+phrases",
            "Method 4 + ending control (ending phrases rewound)",
            "backsteps",
            backstep=_backstep(True, True),
            needs_tokenizer=True,
        ),
        Method(
            "chat",
            "chat preset: Method 4 + chat endings rewound + loop rewinds",
            "backsteps",
            backstep=_chat,
            needs_tokenizer=True,
        ),
    )
}


@dataclass
class GenerationPlan:
    """The ``generate()`` arguments of one method: ``kwargs`` to pass, the processor to read afterwards,
    and whether the model needs ``make_perpetual`` (backstep methods)."""

    method: Method
    kwargs: dict[str, Any]
    processor: Any = None
    perpetual: bool = False


def _method(name: object) -> Method:
    return METHODS[_validation.choice(name, "method", list(METHODS))]


def generation_arguments(
    method: str, eos: Sequence[int], settings: MethodSettings, tokenizer: Any = None
) -> GenerationPlan:
    """What to pass to ``generate()`` for ``method`` (besides the sampling settings, see :func:`sampling_kwargs`)."""
    entry = _method(method)
    if not isinstance(settings, MethodSettings):
        raise TypeError(f"`settings` must be a MethodSettings, got {type(settings).__name__}")
    eos_list = list(_validation.eos_ids(list(eos)))
    kwargs: dict[str, Any] = {}
    processor = None
    if entry.processor is not None:
        processor = entry.processor(eos_list, settings)
        kwargs["logits_processor"] = [processor]
    if entry.backstep is not None:
        kwargs["backstep"] = entry.backstep(settings)
        kwargs["tokenizer"] = tokenizer  # phrase bans decode with it; harmless otherwise
    if entry.needs_tokenizer and tokenizer is None:
        raise ValueError(f"method {entry.name!r} needs the tokenizer (`tokenizer`)")
    return GenerationPlan(entry, kwargs, processor, entry.backstep is not None)


def sampling_kwargs(settings: MethodSettings) -> dict[str, Any]:
    """The sampling arguments of ``generate()`` for ``settings``."""
    return {
        "do_sample": True,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
    }
