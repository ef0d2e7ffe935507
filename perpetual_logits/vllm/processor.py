"""Methods 1 and 2, and the backstep driver's per-request temperature and bans, as one vLLM logits processor.

vLLM 0.32 has two logits-processor interfaces, one per model runner:

* the V1 model runner (CPU builds, and GPU builds with ``VLLM_USE_V2_MODEL_RUNNER=0``):
  ``vllm.v1.sample.logits_processor.LogitsProcessor`` -- ``__init__(vllm_config, device, is_pin_memory)``,
  ``update_state(batch_update)`` with added/removed/moved batch indices, ``apply(logits)`` where row ``i`` is
  batch index ``i``;
* the V2 model runner (the default of GPU builds with Triton): ``vllm.v1.worker.gpu.sample.logits_processor
  .LogitsProcessor`` -- ``__init__(vllm_config, req_states)``, ``add_request(slot, params)``,
  ``apply_staged_writes()``, ``apply(logits, ctx)`` where ``ctx.expanded_idx_mapping`` maps rows to slots.

:class:`PerpetualLogitsProcessor` subclasses both (whichever this vLLM has), so the one class registers on
either runner: ``vllm.LLM(..., logits_processors=[PerpetualLogitsProcessor])``. Both runners call it on the
raw logits, before temperature and top-k/top-p, as transformers does with our HF processors; so the
multiplier composes with ``SamplingParams.temperature`` (``T_effective = temperature * multiplier``) and a
ban before top-k leaves the next token in.

Importing this module never needs vLLM (the class then has no vLLM base and is only useful for tests).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .settings import RequestSettings

__all__ = ["PerpetualLogitsProcessor"]

_BASES: list[type] = []
try:  # the V1 model runner's interface
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Base

    _BASES.append(_V1Base)
except ImportError:  # vLLM absent: the class still imports (doctests, type checks)
    pass
try:  # the V2 model runner's interface
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2Base

    _BASES.append(_V2Base)
except ImportError:
    pass


@dataclass
class _Live:
    """One request in the batch: its settings and the state Method 2 keeps."""

    settings: RequestSettings
    eos: tuple[int, ...]
    output: list[int] | None = None  # V1: vLLM's live list of the request's output tokens
    prompt_length: int = 0  # V2: generated index = position + 1 - prompt length
    last_eviction: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)


def _eos_of(settings: RequestSettings, params: Any) -> tuple[int, ...]:
    if settings.eos is not None:
        return settings.eos
    # Every id that would stop this request: the tokenizer's EOS, the generation config's EOS ids (vLLM adds
    # them to the stop ids) and the request's own stop_token_ids.
    ids = set(getattr(params, "all_stop_token_ids", None) or ())
    eos = getattr(params, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    return tuple(sorted(ids))


def _generator(settings: RequestSettings, params: Any) -> torch.Generator | None:
    if settings.resample is None or settings.trigger != "sample":
        return None
    seed = settings.seed if settings.seed is not None else getattr(params, "seed", None)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


class _ProcessorCore:
    """The per-request logic, independent of which vLLM interface calls it.

    Per row and step, in this order (the order of the HF backend):

    1. Method 2 decides an eviction on the incoming logits (``"sample"``: with the EOS probability, drawn
       from the request's own generator; ``"argmax"``; or a threshold);
    2. bans of this position are set to -inf;
    3. the logits are divided by the multiplier (Method 2's schedule since the eviction, or the driver's
       schedule since position 0);
    4. EOS is masked (Methods 1 and 2).

    A row whose every token would be masked keeps its logits (it emits what is left rather than NaN).
    """

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        # V1 passes (device, is_pin_memory), V2 passes (req_states).
        self.requests: dict[int, _Live] = {}
        self.req_states = args[0] if len(args) == 1 else None
        self.device = getattr(self.req_states, "device", None) if len(args) == 1 else (args[0] if args else None)

    # -- shared ---------------------------------------------------------------------------------------------
    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Reject malformed settings at admission (vLLM turns the ValueError into a request error)."""
        RequestSettings.parse(getattr(sampling_params, "extra_args", None))

    def is_argmax_invariant(self) -> bool:
        # Bans and EOS masking change the argmax.
        return False

    def _new(self, params: Any) -> _Live | None:
        settings = RequestSettings.parse(getattr(params, "extra_args", None))
        if settings is None:
            return None
        return _Live(settings, _eos_of(settings, params), generator=_generator(settings, params))

    def _process(self, logits: torch.Tensor, rows: list[tuple[int, _Live, int]]) -> torch.Tensor:
        """Apply the settings of ``rows`` = (logits row, request, generated index) in place."""
        if not rows:
            return logits
        evictions = self._evictions(logits, rows)
        factors = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
        scaled = False
        masked_rows: list[int] = []
        masked_cols: list[int] = []
        for (row, live, index), evicted in zip(rows, evictions):
            s = live.settings
            if evicted:
                live.last_eviction = index
            banned = s.bans.get(index, ()) if s.bans else ()
            drop_eos = s.suppress_eos or s.resample is not None
            for token in (*banned, *(live.eos if drop_eos else ())):
                masked_rows.append(row)
                masked_cols.append(token)
            factor = 1.0
            if s.resample is not None and live.last_eviction is not None:
                factor = s.resample(index - live.last_eviction)
            elif s.schedule is not None:
                factor = s.schedule(index)
            if factor != 1.0:
                factors[row] = factor
                scaled = True
        if masked_rows:
            self._mask(logits, masked_rows, masked_cols)
        if scaled:
            logits.div_(factors[:, None])
        return logits

    @staticmethod
    def _evictions(logits: torch.Tensor, rows: list[tuple[int, _Live, int]]) -> list[bool]:
        """Method 2's trigger per row, on the incoming logits (before bans and masking)."""
        out = [False] * len(rows)
        todo = [i for i, (_, live, _) in enumerate(rows) if live.settings.resample is not None]
        if not todo:
            return out
        index = torch.tensor([rows[i][0] for i in todo], device=logits.device)
        sub = logits.index_select(0, index).float()
        probs = torch.softmax(sub, dim=-1)
        for j, i in enumerate(todo):
            live = rows[i][1]
            eos = torch.tensor(live.eos, device=logits.device)
            trigger = live.settings.trigger
            if trigger == "argmax":
                out[i] = bool(sub[j].index_select(0, eos).amax() >= sub[j].amax())
                continue
            p_eos = float(probs[j].index_select(0, eos).sum())
            if trigger == "sample":
                draw = float(torch.rand((), generator=live.generator))
                out[i] = draw < p_eos
            else:
                out[i] = p_eos >= float(trigger)
        return out

    @staticmethod
    def _mask(logits: torch.Tensor, rows: list[int], cols: list[int]) -> None:
        """Set (row, col) to -inf, except in rows where nothing finite would be left."""
        r = torch.tensor(rows, device=logits.device)
        c = torch.tensor(cols, device=logits.device)
        touched = sorted(set(rows))
        t = torch.tensor(touched, device=logits.device)
        before = logits.index_select(0, t)
        logits.index_put_((r, c), torch.tensor(float("-inf"), device=logits.device, dtype=logits.dtype))
        empty = ~torch.isfinite(logits.index_select(0, t)).any(-1)
        if bool(empty.any()):
            restore = t[empty]
            logits.index_copy_(0, restore, before[empty])

    # -- V1 interface ---------------------------------------------------------------------------------------
    def update_state(self, batch_update: Any) -> None:
        """V1: follow the persistent batch (removed, then added, then moved)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            live = self._new(params)
            if live is None:
                self.requests.pop(index, None)
            else:
                live.output = output
                self.requests[index] = live
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            swap = getattr(direction, "name", str(direction)) == "SWAP"
            if first is not None:
                self.requests[b] = first
            if swap and second is not None:
                self.requests[a] = second

    # -- V2 interface ---------------------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        """V2: (re)initialise slot ``req_idx``; returns whether this processor changes its logits."""
        live = self._new(sampling_params)
        if live is None:
            self.requests.pop(req_idx, None)
            return False
        if self.req_states is not None:
            live.prompt_length = int(self.req_states.prompt_len.np[req_idx])
        self.requests[req_idx] = live
        return True

    def apply_staged_writes(self) -> None:
        """V2: nothing is staged on the device; the state is host-side and small."""

    # -- both -----------------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """V1: ``apply(logits)``, row = batch index. V2: ``apply(logits, ctx)``, rows mapped to slots by ctx."""
        if not self.requests:
            return logits
        rows: list[tuple[int, _Live, int]] = []
        if ctx is None:
            for index, live in self.requests.items():
                if index < logits.shape[0] and live.output is not None:
                    rows.append((index, live, len(live.output)))
        else:
            slots = ctx.expanded_idx_mapping.tolist()
            positions = ctx.pos.tolist()
            for row, slot in enumerate(slots):
                found = self.requests.get(slot)
                if found is not None:
                    # The token sampled from this row lands at position pos + 1.
                    rows.append((row, found, positions[row] + 1 - found.prompt_length))
        return self._process(logits, rows)


# One class on both interfaces. Built with types.new_class so that the metaclass (ABCMeta) is resolved from
# whichever bases exist; module and qualname make it picklable by reference for vLLM's worker processes.
PerpetualLogitsProcessor: Any = types.new_class("PerpetualLogitsProcessor", (_ProcessorCore, *_BASES), {})
PerpetualLogitsProcessor.__module__ = __name__
PerpetualLogitsProcessor.__qualname__ = "PerpetualLogitsProcessor"
PerpetualLogitsProcessor.__doc__ = """Our vLLM logits processor (Methods 1-2, the driver's temperature and bans).

Register it with ``vllm.LLM(..., logits_processors=[PerpetualLogitsProcessor])`` (or use
:func:`perpetual_logits.vllm.LLM`), then ask for it per request through ``SamplingParams(extra_args=...)``,
built with :func:`~perpetual_logits.vllm.suppress_eos` or :func:`~perpetual_logits.vllm.resample_eos`.
Requests without our key are left untouched. See :class:`_ProcessorCore` for the rules."""
