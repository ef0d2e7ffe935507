"""Every private transformers call the package makes, in one place, each with the reason it is needed.

Supported: transformers >= 5.17, < 6 (checked once at import). The backstep loop replaces
``GenerationMixin._sample`` and so needs some of the pieces ``_sample`` itself uses; everything else in the
package goes through public API.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import Any

import torch

MIN_TRANSFORMERS = "5.17"
MAX_TRANSFORMERS_EXCLUSIVE = "6"


def check_transformers_version(installed: str | None = None) -> None:
    """Raise ImportError naming the supported range when the installed transformers is outside it."""
    from packaging.version import Version

    if installed is None:
        import transformers

        installed = transformers.__version__
    version = Version(installed)
    if version < Version(MIN_TRANSFORMERS) or version >= Version(MAX_TRANSFORMERS_EXCLUSIVE):
        raise ImportError(
            f"perpetual_logits needs transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"found {installed}. Install a supported version: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )


# -- generation output ---------------------------------------------------------------------------------------
def output_cache_field() -> str:
    """The field of ``GenerateDecoderOnlyOutput`` that holds the cache: renamed ``past_key_values`` -> ``cache``
    after 5.18; the output must use the name the installed version has."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {f.name for f in fields(GenerateDecoderOnlyOutput)}
    return "cache" if "cache" in names else "past_key_values"


def cache_kwarg(model_kwargs: dict[str, Any]) -> str:
    """The model kwarg that carries the cache (``past_key_values`` up to 5.18, ``cache`` after)."""
    return "cache" if "cache" in model_kwargs else "past_key_values"


# -- special tokens ------------------------------------------------------------------------------------------
def eos_tensor(generation_config: Any) -> torch.Tensor | None:
    """``generate()`` has already turned eos_token_id (int, list or tensor) into ``_eos_token_tensor``: reading it
    keeps our EOS set identical to the one its own stopping criterion uses."""
    return generation_config._eos_token_tensor


def pad_tensor(generation_config: Any) -> torch.Tensor | None:
    """Likewise for the pad id (pad falls back to eos[0] there)."""
    return generation_config._pad_token_tensor


# -- the pieces of `_sample` -------------------------------------------------------------------------------
def prefill(model: Any, input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any]) -> Any:
    """The prompt forward exactly as ``_sample`` runs it (chunked prefill, inputs_embeds, a passed cache)."""
    return model._prefill(
        input_ids, generation_config, model_kwargs, is_first_iteration=not generation_config.is_assistant
    )


def update_after_prefill(model: Any, outputs: Any, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Stores the prefill's cache into the kwargs the way ``_sample`` does (names differ across versions)."""
    return model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)


def decode_forward(model: Any, generation_config: Any, model_kwargs: dict[str, Any]) -> Any:
    """The callable ``_sample`` uses for decode steps: the compiled forward when generate() would compile
    (static cache on an accelerator), else the plain one. Backstep keeps input shapes fixed, so a compiled
    forward is reused across rewinds."""
    if model._valid_auto_compile_criteria(model_kwargs, generation_config):
        return model.get_compiled_call(generation_config.compile_config)
    return model.__call__


def decode_context(model: Any) -> contextlib.AbstractContextManager[Any]:
    """``_sample`` decodes inside ``_optimize_model_for_decode()`` (MoE kernels switch there)."""
    optimize = getattr(model, "_optimize_model_for_decode", None)
    return optimize() if optimize is not None else contextlib.nullcontext()


def step_inputs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    cache_key: str,
    cache: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Model inputs for one decode step, built by the model's own ``prepare_inputs_for_generation`` (models
    override it, e.g. to add their own kwargs)."""
    return model.prepare_inputs_for_generation(
        input_ids,
        next_sequence_length=1,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_key: cache},
        **extra,
    )


# -- cache layers ------------------------------------------------------------------------------------------
def cache_layers(cache: Any) -> list[Any]:
    """A transformers 5 ``Cache`` is a list of per-layer objects holding ``keys`` / ``values`` tensors of shape
    (batch, heads, slots, head_dim). Backstep moves a row's slots inside them; the public API can only crop
    the end of every row at once."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"backstep generation needs a transformers Cache, got {type(cache).__name__}")
    return list(layers)


def is_static_layer(layer: Any) -> bool:
    """Fixed-size layers (StaticLayer and its subclasses) keep a pre-allocated buffer; their fill level is a
    counter that ``crop`` lowers."""
    return hasattr(layer, "max_cache_len")


def layer_width(layer: Any) -> int:
    """Slots in use in one layer."""
    if not getattr(layer, "is_initialized", True) or layer.keys is None:
        return 0
    return int(layer.get_seq_length()) if is_static_layer(layer) else int(layer.keys.shape[-2])


def move_slots(cache: Any, rows: torch.Tensor, index: torch.Tensor, old_width: int, new_width: int) -> None:
    """Rebuild ``rows`` of every layer so that new slot ``j`` of row ``rows[i]`` holds old slot ``index[i, j]``,
    and shrink every row to ``new_width`` slots (``new_width <= old_width``).

    Rows not listed keep their slots ``[0, new_width)``. Only the listed rows are copied: static layers are
    rewritten in place (their buffers are static addresses for torch.compile) and their fill counter lowered in
    place; dynamic layers keep their storage too, unless every row moves.
    """
    drop = old_width - new_width
    everyone = rows.numel() > 0 and rows.numel() == _batch_size(cache)
    for layer in cache_layers(cache):
        if layer_width(layer) == 0:
            continue
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            moved = None
            if rows.numel():
                moved = gather_slots(tensor, rows, index)
            if is_static_layer(layer):
                if moved is not None:
                    tensor[rows, :, :new_width] = moved
                continue
            if everyone and moved is not None:
                tensor = moved  # every row moved: the gathered tensor is the layer
            else:
                tensor = tensor[:, :, :new_width]
                if moved is not None:
                    tensor[rows] = moved  # in place: the layer owns this storage
            setattr(layer, name, tensor)
        if is_static_layer(layer):
            if drop > 0:
                # The fill level of a static layer is the tensor `cumulative_length` (5.17-5.24); 5.24's crop()
                # lowers it in place, 5.17 has no crop(). Lowering it ourselves keeps its static address.
                layer.cumulative_length.sub_(drop)
        elif hasattr(layer, "cumulative_length"):
            # Sliding-window dynamic layers count every token they saw; within the window that is the width.
            layer.cumulative_length = new_width


def gather_slots(tensor: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[i, h, j] = tensor[rows[i], h, index[i, j]]`` for a ``(batch, heads, slots, dim)`` cache tensor.

    One ``index_select`` of whole ``dim``-vectors from the tensor's storage when its layout allows (the usual
    case, a slice of a contiguous tensor included); else ``gather`` over the expanded index, which reads element
    by element and takes about eight times as long (batch 32, 4 heads of 32, 100 slots, on one CPU core).
    """
    dim = tensor.shape[-1]
    strides, offset = tensor.stride(), tensor.storage_offset()
    if strides[-1] != 1 or offset % dim or any(s % dim for s in strides[:-1]):
        expanded = index[:, None, :, None].expand(-1, tensor.shape[1], -1, dim)
        return tensor[rows].gather(2, expanded)
    heads = torch.arange(tensor.shape[1], device=tensor.device)
    vectors = rows[:, None, None] * (strides[0] // dim) + heads[None, :, None] * (strides[1] // dim)
    vectors = vectors + index[:, None, :] * (strides[2] // dim) + offset // dim
    stored = tensor.untyped_storage().nbytes() // (tensor.element_size() * dim)
    flat = tensor.as_strided((stored, dim), (dim, 1), 0)  # the storage as rows of dim values
    return flat.index_select(0, vectors.reshape(-1)).view(rows.numel(), tensor.shape[1], -1, dim)


def _batch_size(cache: Any) -> int:
    for layer in cache_layers(cache):
        if layer_width(layer):
            return int(layer.keys.shape[0])
    return 0


# -- context shift -----------------------------------------------------------------------------------------
def fresh_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for the model (the context shift re-feeds kept tokens into one)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def rotary_inv_freq(model: Any) -> torch.Tensor:
    """The rotary embedding's frequencies (``inv_freq`` of the model's rotary module): cached keys are stored
    already rotated, and moving them to other positions means rotating them again."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return inv_freq.detach().float()
    raise ValueError(
        f"ContextShift(method='rerotate') needs a rotary-embedding model; {type(model).__name__} has none "
        "(use method='reprefill')"
    )


def rotate_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys (heads, slots, head_dim) rotated as if their positions moved by ``delta``, in the rotate-half layout
    transformers' Llama-family models use (a partial rotary rotates the first ``2 * len(inv_freq)`` dims)."""
    angles = delta * inv_freq.to(keys.device)
    cos = torch.cat([angles, angles]).cos().to(keys.dtype)
    sin = torch.cat([angles, angles]).sin().to(keys.dtype)
    dims = cos.numel()
    rotary, rest = keys[..., :dims], keys[..., dims:]
    half = dims // 2
    rotated_half = torch.cat([-rotary[..., half:], rotary[..., :half]], dim=-1)
    return torch.cat([rotary * cos + rotated_half * sin, rest], dim=-1)
