"""The prompt forward and what it leaves for the decode loop: the first logits, the cache layout, the decode step
and the context window.

:func:`prefill` runs when :class:`~perpetual_logits.backstep.loop.BackstepLoop` is built, so the loop starts
with every unit whole: nothing is created halfway through a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import _compat
from .cache import CacheLayout, check_cache, check_static_size
from .window import ContextShift, ContextWindow

__all__ = ["DecodeStep", "Prefill", "prefill"]

# Model kwargs the decode step rebuilds itself each step (the rest is passed on as the model gave it).
_PER_STEP = ("cache", "past_key_values", "attention_mask", "position_ids", "inputs_embeds", "use_cache")


class DecodeStep:
    """One decode forward of the batch: one token per row, built into model inputs by the model's own
    ``prepare_inputs_for_generation``, run by the forward ``generate()`` would use (compiled or not).

    Args:
        model: the model.
        forward: the callable to run (``model.__call__`` or its compiled form).
        cache_key: the model kwarg that carries the cache.
        cache: the transformers ``Cache`` the prompt forward filled.
        extra: the other model kwargs the prompt forward left (passed on unchanged every step).
        device: where the returned logits live.
    """

    def __init__(
        self, model: Any, forward: Any, cache_key: str, cache: Any, extra: dict[str, Any], device: torch.device
    ) -> None:
        self.model = model
        self.forward = forward
        self.cache_key = cache_key
        self.cache = cache
        self.extra = extra
        self.device = device

    def __call__(self, tokens: list[int], mask: torch.Tensor | None, positions: list[int]) -> torch.Tensor:
        """Feed ``tokens[b]`` at ``positions[b]`` for every row; return the raw logits (batch, vocab), float32."""
        inputs = _compat.step_inputs(
            self.model,
            torch.tensor(tokens, device=self.device)[:, None],
            mask,
            torch.tensor(positions, device=self.device)[:, None],
            self.cache_key,
            self.cache,
            self.extra,
        )
        outputs = self.forward(**inputs, return_dict=True)
        return outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.device)


@dataclass(frozen=True)
class Prefill:
    """What the prompt forward leaves for the decode loop.

    Attributes:
        logits: each row's raw logits for its first generated position, (batch, vocab), float32.
        cache: the layout of the cache the prompt filled (not started yet: the loop starts every unit).
        decode: the forward of one decode step.
        window: the context shift, when ``BackstepConfig(window=...)`` asks for one.
    """

    logits: torch.Tensor
    cache: CacheLayout
    decode: DecodeStep
    window: ContextWindow | None


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    generation_config: Any,
    model_kwargs: dict[str, Any],
    capacity: int,
    text_start: list[int],
    window: ContextShift | None = None,
) -> Prefill:
    """Run the prompt forward as ``_sample`` runs it and build what the decode loop needs from its result.

    Args:
        model: the model (a ``GenerationMixin``).
        input_ids: the prompt, (batch, prompt_length); (batch, 0) when the prompt is given as ``inputs_embeds``.
        generation_config: ``generate()``'s generation config.
        model_kwargs: ``generate()``'s model kwargs (attention mask, cache, ...).
        capacity: the most slots a row may use: ``max_length``, less for a sliding-window model.
        text_start: per row, the index of its first real token (after left padding).
        window: the context shift settings, or ``None``.

    Raises:
        ValueError: a cache that cannot be rewound, a fixed-size cache too small for the run, a prompt the cache
            did not take whole, a context shift with ``inputs_embeds``.
    """
    prompt_length = input_ids.shape[1]
    prompt_mask: torch.Tensor | None = model_kwargs.get("attention_mask")
    cache_key = _compat.cache_kwarg(model_kwargs)
    check_cache(model_kwargs.get(cache_key))
    outputs = _compat.prefill(model, input_ids, generation_config, model_kwargs)
    kwargs = _compat.update_after_prefill(model, outputs, model_kwargs)
    cache = kwargs[cache_key]
    prompt_slots = cache.get_seq_length()
    if kwargs.get("inputs_embeds") is None and prompt_slots != prompt_length:
        raise ValueError(
            f"backstep generation expected the prompt's {prompt_length} tokens in the cache after the prompt "
            f"forward, found {prompt_slots}"
        )
    device = input_ids.device
    extra = {k: v for k, v in kwargs.items() if k not in _PER_STEP}
    decode = DecodeStep(
        model, _compat.decode_forward(model, generation_config, kwargs), cache_key, cache, extra, device
    )
    static = [layer.max_cache_len for layer in _compat.cache_layers(cache) if _compat.is_static_layer(layer)]
    prefix = prompt_slots - prompt_length  # inputs_embeds: max_length counts generated tokens only
    check_static_size(static, capacity + prefix, input_ids.shape[0])
    layout = CacheLayout(cache, prompt_mask, prompt_length, min([capacity + prefix, *static]), device)
    context: ContextWindow | None = None
    if window is not None:
        if prefix:
            raise ValueError("BackstepConfig(window=...) needs the prompt as input_ids, not inputs_embeds")
        context = ContextWindow(window, model, text_start, prompt_length, cache_key)
        # A row's slots never pass its left padding + the limit; a wider layout is tightened instead (one more
        # column: a row that finished with a full window takes a masked slot while another row writes).
        layout.capacity = min(layout.capacity, context.limit + max(text_start) + 1)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
    return Prefill(logits=logits, cache=layout, decode=decode, window=context)
