"""``PerpetualGenerationMixin``: backstep generation behind the ordinary ``model.generate()``.

transformers looks the decoding method up on the model's *class* (``_sample`` for sampling and greedy), so
the mixin overrides ``_sample`` and ``generate`` and stays out of the way when no backstep is asked for.
:func:`make_perpetual` attaches it to a model that is already loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar, cast

import torch
from transformers import GenerationMixin

from .backstep import BackstepConfig, BackstepLoop
from .backstep.events import BackstepStats, RewindEvent
from .processor_list import check_no_double_truncation
from .protocol import PerCallState

__all__ = ["PerpetualGenerationMixin", "make_perpetual"]

_UNSUPPORTED_KWARGS = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "penalty_alpha": "contrastive search",
    "dola_layers": "DoLa decoding",
    "num_beam_groups": "group beam search",
    "constraints": "constrained beam search",
    "force_words_ids": "constrained beam search",
    "custom_generate": "custom_generate",
    "synced_gpus": "synced_gpus",
}
_SUPPORTED = "backstep= supports sampling (do_sample=True) and greedy decoding with num_beams=1"


class _CallScope:
    """One backstep ``generate()`` call, as the methods transformers calls inside it see it: its settings, and the
    loop once one runs. :meth:`PerpetualGenerationMixin.generate` enters it; ``_sample`` (and the cache and
    beam-search hooks) read it with :meth:`current`.

    Why not arguments: ``generate()`` validates its model kwargs (an unknown one is an error) and calls ``_sample``
    itself, with arguments of its own choosing, so nothing of ours can ride along. Why not attributes of the
    model: one model serves many threads at once, and a call's settings must not leak into a concurrent call.
    A context variable is private to the thread (and to the asyncio task) that entered it.

    Args:
        config: the call's backstep settings.
        tokenizer: reads text for phrase and line checks (``None`` when the settings read none).
    """

    _active: ClassVar[contextvars.ContextVar[_CallScope | None]] = contextvars.ContextVar(
        "perpetual_backstep_call", default=None
    )

    def __init__(self, config: BackstepConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.loop: BackstepLoop | None = None  # set while the loop runs (its events feed event_counts)

    @classmethod
    def current(cls) -> _CallScope | None:
        """The backstep call this thread is inside, or ``None`` (no call, or a plain one)."""
        return cls._active.get()

    @classmethod
    @contextlib.contextmanager
    def entered(cls, scope: _CallScope | None) -> Iterator[None]:
        """Make ``scope`` current for the block; ``None`` marks a plain call (also one nested in a backstep one)."""
        token = cls._active.set(scope)
        try:
            yield
        finally:
            cls._active.reset(token)


# This thread's latest backstep result: it outlives the call, so it is kept apart from the call's scope.
_LAST: contextvars.ContextVar[tuple[list[list[RewindEvent]], BackstepStats] | None] = contextvars.ContextVar(
    "perpetual_backstep_last", default=None
)


class PerpetualGenerationMixin(GenerationMixin):
    """Adds ``backstep=`` (Methods 3 and 4) to ``generate()``; without it, generation is unchanged.

    Use it as the first base of a model class, or attach it to a loaded model with :func:`make_perpetual`.
    A default :class:`BackstepConfig` can be set on the model (``model.backstep_config = ...``) so that code
    which only calls ``generate()`` -- a ``pipeline("text-generation")`` -- gets backstep too; pass
    ``backstep=False`` to turn it off for one call. ``model.backstep_tokenizer`` is used by phrase and
    line checks when a call passes no ``tokenizer=``.

    Results: with ``return_dict_in_generate=True`` the output carries ``backstep_events`` / ``backstep_stats``.
    ``model.last_backstep`` holds ``(events, stats)`` of the latest backstep call *of the current thread* (a
    context variable): concurrent calls from other threads do not overwrite it.

    The model is safe to call from several threads at once with different settings: nothing call-scoped is
    stored on the model instance.
    """

    backstep_config: BackstepConfig | None = None
    backstep_tokenizer: Any = None

    @property
    def last_backstep(self) -> tuple[list[list[RewindEvent]], BackstepStats] | None:
        """``(events, stats)`` of this thread's latest backstep ``generate()`` call, or ``None``."""
        return _LAST.get()

    @last_backstep.setter
    def last_backstep(self, value: tuple[list[list[RewindEvent]], BackstepStats] | None) -> None:
        _LAST.set(value)

    def event_counts(self, batch_size: int) -> list[int]:
        """Rewinds per row of this thread's backstep run in progress (the ``EventSource`` protocol of
        :class:`~perpetual_logits.EvictionBudgetCriteria`); zeros outside a run."""
        scope = _CallScope.current()
        loop = scope.loop if scope is not None else None
        return [len(e) for e in loop.events] if loop is not None else [0] * batch_size

    @torch.no_grad()
    def generate(self, *args: Any, backstep: BackstepConfig | bool | None = None, **kwargs: Any) -> Any:
        if backstep is None or backstep is True:
            config = self.backstep_config
            if backstep is True and config is None:
                config = BackstepConfig()
        elif backstep is False:
            config = None
        elif isinstance(backstep, BackstepConfig):
            config = backstep
        else:
            raise ValueError(f"`backstep` must be a BackstepConfig, True, False or None, got {backstep!r}")
        if config is not None:
            for name, mode in _UNSUPPORTED_KWARGS.items():
                if kwargs.get(name) not in (None, False):
                    raise ValueError(f"{_SUPPORTED}; got {mode} ({name}=...)")
            if kwargs.get("tokenizer") is None and self.backstep_tokenizer is not None and config.reads_text:
                kwargs["tokenizer"] = self.backstep_tokenizer
        # Processors are reused across calls: a new call starts their records afresh. The one place they are reset,
        # for every method (the backstep loop also starts those that follow rows, RowState, at their prompt).
        processors = kwargs.get("logits_processor", args[2] if len(args) > 2 else None)
        for proc in processors or ():
            _reset_for_call(proc)
        with _CallScope.entered(_CallScope(config, kwargs.get("tokenizer")) if config is not None else None):
            return super().generate(*args, **kwargs)

    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        # A Method 2 processor with `widen=` truncates itself: generate()'s own top-k/top-p must then be off.
        check_no_double_truncation(logits_processor, generation_config)
        scope = _CallScope.current()
        if scope is None:
            return super()._sample(  # type: ignore[misc]
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        if synced_gpus:
            raise ValueError(f"{_SUPPORTED}; synced_gpus is not supported")
        model_kwargs.pop("tokenizer", None)
        model_kwargs.pop("assistant_tokenizer", None)
        loop = BackstepLoop(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer,
            model_kwargs,
            scope.config,
            scope.tokenizer,
        )
        scope.loop = loop
        try:
            output = loop.run()
        finally:
            scope.loop = None
        # The loop reports back through what it holds when it returns; the model keeps this thread's latest run.
        _LAST.set((loop.events, loop.stats))
        return output

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> Any:
        # A fixed-size cache gets max_length slots instead of max_length - 1: a row that reached max_length while a
        # shorter, rewound row still writes keeps its slots, and the other row's new slot needs one more column.
        if _CallScope.current() is not None:
            max_cache_length += 1
        return super()._prepare_cache_for_generation(  # type: ignore[misc]
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def _beam_search(self, *args: Any, **kwargs: Any) -> Any:
        if _CallScope.current() is not None:
            raise ValueError(f"{_SUPPORTED}; got beam search (num_beams > 1)")
        return super()._beam_search(*args, **kwargs)  # type: ignore[misc]

    def _assisted_decoding(self, *args: Any, **kwargs: Any) -> Any:
        if _CallScope.current() is not None:
            raise ValueError(f"{_SUPPORTED}; got assisted decoding")
        return super()._assisted_decoding(*args, **kwargs)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A class made by make_perpetual is not importable under its name: pickle the instance as its original
        # class and attach the mixin again on load (pickle, torch.save and copy.deepcopy all come through here).
        base = _BASES.get(type(self))
        reduced = super().__reduce_ex__(protocol)
        if base is None or not isinstance(reduced, tuple):
            return reduced
        func, args, *rest = reduced
        args = tuple(base if a is type(self) else a for a in args)
        return (_restore_perpetual, (func, args), *rest)


def _reset_for_call(processor: object) -> None:
    """Start a reused processor's per-call records afresh: those that keep them derive from
    :class:`~perpetual_logits.protocol.PerCallState`."""
    if isinstance(processor, PerCallState):
        processor.reset()
        return
    # For one release: a processor with a reset() of its own, not declared a PerCallState, is still reset (it was,
    # by name, before PerCallState existed), with a warning. Remove this probe after that release.
    reset = getattr(processor, "reset", None)
    if callable(reset):
        warnings.warn(
            f"{type(processor).__name__}.reset() is called at the start of each generate() call only for "
            "processors that derive from perpetual_logits.protocol.PerCallState; derive from it (calling reset() "
            "by name alone ends after this release)",
            DeprecationWarning,
            stacklevel=4,
        )
        reset()


def _restore_perpetual(func: Any, args: tuple[Any, ...]) -> Any:
    """Unpickling helper: rebuild the instance as its original class, then make it perpetual again."""
    obj = func(*args)
    return make_perpetual(obj)


_CLASSES: dict[type, type] = {}
_BASES: dict[type, type] = {}  # perpetual class -> the class it was made from


def make_perpetual(model: Any, backstep: BackstepConfig | None = None, tokenizer: Any = None) -> Any:
    """Give a loaded model ``generate(backstep=...)``, in place, and return it.

    The model's class is swapped for a subclass with the same name and module, so
    ``isinstance(model, OriginalClass)`` holds and ``save_pretrained`` writes the same ``architectures``.
    Calling it again is harmless.

    Args:
        model: a transformers causal LM (a ``GenerationMixin``).
        backstep (`BackstepConfig`, *optional*): a default for every ``generate()`` call of this model.
        tokenizer (*optional*): the tokenizer phrase and line checks read text with, for calls that pass no
            ``tokenizer=`` (e.g. inside ``pipeline("text-generation")``).

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from perpetual_logits import BackstepConfig, make_perpetual
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1, eos_token_id=2, pad_token_id=0)
    >>> model = make_perpetual(LlamaForCausalLM(cfg).eval())
    >>> isinstance(model, LlamaForCausalLM), type(model).__name__
    (True, 'LlamaForCausalLM')
    >>> out = model.generate(torch.tensor([[1, 5, 6]]), do_sample=False, max_new_tokens=8,
    ...                      backstep=BackstepConfig(n_remove=2))
    >>> out.shape
    torch.Size([1, 11])

    ```
    """
    if not isinstance(model, GenerationMixin):
        raise ValueError(f"`model` must be a transformers generative model, got {type(model).__name__}")
    if backstep is not None and not isinstance(backstep, BackstepConfig):
        raise ValueError(f"`backstep` must be a BackstepConfig or None, got {backstep!r}")
    cls = type(model)
    if not isinstance(model, PerpetualGenerationMixin):
        perpetual = _CLASSES.get(cls)
        if perpetual is None:
            perpetual = type(
                cls.__name__,
                (PerpetualGenerationMixin, cls),
                {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
            )
            _CLASSES[cls] = perpetual
            _BASES[perpetual] = cls
        model.__class__ = perpetual
    if backstep is not None:
        cast(PerpetualGenerationMixin, model).backstep_config = backstep
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"`tokenizer` must be a tokenizer with decode(), got {type(tokenizer).__name__}")
        cast(PerpetualGenerationMixin, model).backstep_tokenizer = tokenizer
    return model
