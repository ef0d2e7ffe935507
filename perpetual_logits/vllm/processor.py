"""Methods 1 and 2, and the backstep driver's temperature, bans, early triggers and widening, as one vLLM logits
processor.

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

import logging
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributions import distribution_stats
from .settings import EarlySettings, RequestSettings

__all__ = ["PerpetualLogitsProcessor"]

logger = logging.getLogger(__name__)

#: vLLM's threshold below which a temperature means greedy decoding (truncation then changes nothing).
_GREEDY_BELOW = 1e-5
#: Early-trigger histories kept for rows between their engine requests (a resubmission follows at once), and
#: the steps they may hold together (a trigger keeps ``window`` steps): the least recently used go first.
_MAX_HISTORIES = 4096
_MAX_HISTORY_STEPS = 1 << 22

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


class _RowHistory:
    """One driver row's early trigger, kept across the row's engine requests (a rewind is a new request).

    ``observed`` is the row's next generated position the trigger has not seen. Moving to an earlier
    position drops the later steps (``EarlyTrigger.rewind``, as on the HF backend); a gap (the
    history was evicted, or the row moved to another engine) starts afresh.
    """

    def __init__(self, settings: EarlySettings) -> None:
        self.key = (settings.window, settings.eos_threshold, settings.entropy_slope)
        self.trigger = settings.trigger()
        self.trigger.start(1, 0)  # one row; its length counts generated tokens
        self.observed = 0
        self.fired_at: int | None = None  # the latest firing still in the row's text

    def seek(self, position: int) -> None:
        if position < self.observed:
            self.trigger.rewind(0, position)
        elif position > self.observed:
            self.trigger.start(1, position)
        self.observed = position
        if self.fired_at is not None and self.fired_at >= position:
            self.fired_at = None  # fired at a removed position: that start is gone with it

    def update(self, position: int, eos_prob: float, entropy: float) -> bool:
        """Add the step at ``position``; returns whether the trigger fires there."""
        self.seek(position)
        fired = bool(self.trigger.update(torch.tensor([eos_prob]), torch.tensor([entropy]))[0])
        self.observed = position + 1
        if fired:
            self.fired_at = position
        return fired


@dataclass
class _Live:
    """One request in the batch: its settings and the state Method 2, the schedule and widening keep."""

    settings: RequestSettings
    eos: tuple[int, ...]
    output: list[int] | None = None  # V1: vLLM's live list of the request's output tokens
    prompt_length: int = 0  # V2: generated index = position + 1 - prompt length
    last_eviction: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    started: int | None = 0  # where the driver's schedule (last) started; an early trigger moves it
    history: _RowHistory | None = None
    bans: dict[int, tuple[int, ...]] = field(default_factory=dict)
    checked_vocab: int = 0  # the logits width eos and bans were checked against
    sentence_ends: frozenset[int] = frozenset()  # the landing's tokens that end a sentence (a set, for lookups)
    slot: int | None = None  # V2: the request's slot in the model runner's request states


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


def _trigger_stats(scores: torch.Tensor, eos: torch.Tensor, entropy: bool) -> tuple[list[float], list[float]]:
    """Per row: P(EOS) and (when ``entropy``) the entropy in bits, as ``distribution_stats`` computes them (the
    same arithmetic, so the trigger fires where the HF backend's does), skipping what the trigger does not use."""
    if entropy:
        stats = distribution_stats(scores, eos)
        return stats["eos_prob"].tolist(), stats["entropy"].tolist()
    logp = torch.log_softmax(scores.float(), dim=-1)
    eos_prob = torch.logsumexp(logp.index_select(-1, eos), dim=-1).exp()
    return eos_prob.tolist(), [0.0] * scores.shape[0]


def check_truncation_off(params: Any) -> None:
    """Refuse a request with ``widen`` whose own top-k / top-p / min-p or penalties vLLM would still apply.

    vLLM truncates after the logits processors with one value for the whole request, so it would cut every
    widened step back to the configured set; and its V1 model runner applies penalties after the processors
    too, so a set the processor computes could not be the one vLLM would compute after them.
    """
    top_k, top_p, min_p = getattr(params, "top_k", 0), getattr(params, "top_p", 1.0), getattr(params, "min_p", 0.0)
    if top_k not in (0, -1, None) or (top_p is not None and top_p < 1.0) or (min_p or 0.0) > 0.0:
        raise ValueError(
            f"`widen` truncates inside the processor: submit the request with vLLM's truncation off (top_k=0, "
            f"top_p=1.0, min_p=0.0; the configured values go in `widen.configured`), got top_k={top_k}, "
            f"top_p={top_p}, min_p={min_p}"
        )
    penalties = {
        "repetition_penalty": (getattr(params, "repetition_penalty", 1.0), 1.0),
        "frequency_penalty": (getattr(params, "frequency_penalty", 0.0), 0.0),
        "presence_penalty": (getattr(params, "presence_penalty", 0.0), 0.0),
    }
    active = [f"{name}={value}" for name, (value, off) in penalties.items() if value is not None and value != off]
    if active:
        raise ValueError(
            f"`widen` cannot be combined with {', '.join(active)} on vLLM: its V1 model runner applies penalties "
            "after the logits processors, so the widened top-k / top-p / min-p could not be computed on the "
            "penalised logits as vLLM's own truncation is (admission cannot tell which runner serves the request)"
        )


def vllm_truncation(view: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The tokens vLLM's sampler keeps, per row: min-p, then top-k, then top-p (its order and its arithmetic).

    Args:
        view (`torch.Tensor` of shape `(rows, vocab)`): the logits as vLLM's sampler sees them (float32, after
            the temperature).
        top_k (`torch.LongTensor` of shape `(rows,)`): 0 = off.
        top_p (`torch.FloatTensor` of shape `(rows,)`): 1.0 = off.
        min_p (`torch.FloatTensor` of shape `(rows,)`): 0.0 = off.

    Returns:
        `torch.BoolTensor` of shape `(rows, vocab)`: the kept tokens (always at least the top one).

    Example:

    ```python
    >>> import torch
    >>> view = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    >>> vllm_truncation(view, torch.tensor([2, 0]), torch.tensor([1.0, 0.9]), torch.tensor([0.0, 0.0])).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 1, 0]], dtype=torch.int32)

    ```
    """
    view = view.clone()
    if bool((min_p > 0).any()):
        probs = view.softmax(dim=-1)
        view.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * min_p[:, None], float("-inf"))
    vocab = view.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if not bool((top_p < 1.0).any()):
        if bool((k < vocab).any()):  # top-k alone: no sort of the vocabulary (vLLM's apply_top_k_only)
            off = k == vocab
            k = k.masked_fill(off, 1)  # rows without top-k gather a value they then ignore
            kth = view.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
            view.masked_fill_(view < kth.masked_fill(off[:, None], float("-inf")), float("-inf"))
    else:
        ordered, order = view.sort(dim=-1, descending=False)
        kth = ordered.gather(1, (vocab - k)[:, None])
        ordered.masked_fill_(ordered < kth, float("-inf"))
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Rows without top-p compare with -1 (never): tokens whose probability underflows to 0 stay.
        below = cumulative <= torch.where(top_p < 1.0, 1 - top_p, -1.0)[:, None]
        below[:, -1] = False
        ordered.masked_fill_(below, float("-inf"))
        view = ordered.scatter(-1, order, ordered)
    return view > float("-inf")


class _ProcessorCore:
    """The per-request logic, independent of which vLLM interface calls it.

    Per row and step, in this order (the order of the HF backend):

    1. Method 2 decides an eviction on the incoming logits (``"sample"``: with the EOS probability, drawn
       from the request's own generator; ``"argmax"``; or a threshold);
    2. the early trigger sees the incoming logits; where it fires, the driver's schedule starts here;
    3. bans of this position are set to -inf, and EOS is masked (Methods 1 and 2);
    4. the logits are divided by the multiplier (Method 2's schedule since the eviction, or the driver's
       schedule since it started);
    5. with ``widen``: top-k / top-p / min-p, wider since the schedule started (vLLM's own are off).

    A row whose every token would be masked keeps its logits (it emits what is left rather than NaN).
    """

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        # V1 passes (device, is_pin_memory), V2 passes (req_states).
        self.requests: dict[int, _Live] = {}
        self.histories: OrderedDict[str, _RowHistory] = OrderedDict()  # early triggers by driver row
        self.req_states = args[0] if len(args) == 1 else None
        self.device = getattr(self.req_states, "device", None) if len(args) == 1 else (args[0] if args else None)

    # -- shared ---------------------------------------------------------------------------------------------
    #: The model's vocabulary size where the class knows it (:func:`processor_for_vocabulary`): admission then
    #: refuses token ids the model does not have.
    vocab_size: int | None = None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Reject malformed settings at admission (vLLM turns the ValueError into a request error)."""
        settings = RequestSettings.parse(getattr(sampling_params, "extra_args", None), cls.vocab_size)
        if settings is not None and settings.widen is not None:
            check_truncation_off(sampling_params)

    def is_argmax_invariant(self) -> bool:
        # Bans and EOS masking change the argmax.
        return False

    def _new(self, params: Any, generated: int = 0) -> _Live | None:
        """The state of a new request that has ``generated`` tokens already (a preempted request coming back).
        Never raises: an exception here would take the engine down."""
        try:
            settings = RequestSettings.parse(getattr(params, "extra_args", None))
        except ValueError as error:  # validate_params refuses these at admission; this is a second guard
            logger.warning("perpetual_logits: request settings ignored (%s)", error)
            return None
        if settings is None:
            return None
        live = _Live(settings, _eos_of(settings, params), generator=_generator(settings, params))
        live.started = settings.started
        live.bans = dict(settings.bans or {})
        if settings.landing is not None:
            live.sentence_ends = frozenset(settings.landing.sentence_ends)
        if settings.early is not None:
            live.history = self._history(settings.early, generated)
            if live.history.fired_at is not None:  # the latest start wins: a firing after the driver's start
                fired = live.history.fired_at - settings.early.at
                live.started = fired if live.started is None else max(live.started, fired)
        return live

    def _history(self, early: EarlySettings, generated: int) -> _RowHistory:
        """The row's history, positioned at the request's next generated position."""
        found = self.histories.pop(early.row, None)
        if found is None or found.key != (early.window, early.eos_threshold, early.entropy_slope):
            found = _RowHistory(early)
        found.seek(early.at + generated)
        self.histories[early.row] = found  # most recently used last
        steps = sum(h.trigger.window for h in self.histories.values())
        while len(self.histories) > 1 and (len(self.histories) > _MAX_HISTORIES or steps > _MAX_HISTORY_STEPS):
            _, dropped = self.histories.popitem(last=False)
            steps -= dropped.trigger.window
        return found

    @staticmethod
    def _check_vocabulary(live: _Live, vocab: int) -> None:
        """Drop ids outside the logits (admission refuses them where it knows the vocabulary; an id the model
        does not have can never be sampled, so masking or counting it is a no-op)."""
        live.checked_vocab = vocab
        outside = sorted(
            {t for t in live.eos if t >= vocab} | {t for ts in live.bans.values() for t in ts if t >= vocab}
        )
        if outside:
            logger.warning("perpetual_logits: token ids %s are outside the vocabulary (%d) and ignored", outside, vocab)
            live.eos = tuple(t for t in live.eos if t < vocab)
            live.bans = {pos: tuple(t for t in ts if t < vocab) for pos, ts in live.bans.items()}

    def _process(self, logits: torch.Tensor, rows: list[tuple[int, _Live, int]]) -> torch.Tensor:
        """Apply the settings of ``rows`` = (logits row, request, generated index) in place."""
        if not rows:
            return logits
        vocab = logits.shape[-1]
        for _, live, _ in rows:
            if live.checked_vocab != vocab:
                self._check_vocabulary(live, vocab)
        evictions = self._evictions(logits, rows)
        self._early(logits, rows)
        factors = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
        scaled = False
        masked_rows: list[int] = []
        masked_cols: list[int] = []
        for (row, live, index), evicted in zip(rows, evictions):
            s = live.settings
            if evicted:
                live.last_eviction = index
            banned = live.bans.get(index, ())
            drop_eos = s.suppress_eos or s.resample is not None
            for token in (*banned, *(live.eos if drop_eos else ())):
                masked_rows.append(row)
                masked_cols.append(token)
            factor = 1.0
            if s.resample is not None and live.last_eviction is not None:
                factor = s.resample(index - live.last_eviction)
            elif s.schedule is not None and live.started is not None:
                factor = s.schedule(index - live.started)
            if factor != 1.0:
                factors[row] = factor
                scaled = True
        self._land(logits, rows)
        if masked_rows:
            self._mask(logits, masked_rows, masked_cols)
        if scaled:
            logits.div_(factors[:, None])
        self._truncate(logits, rows)
        return logits

    def _land(self, logits: torch.Tensor, rows: list[tuple[int, _Live, int]]) -> None:
        """The landing: raise EOS for rows in their landing zone whose previous token ends a sentence (on the raw
        logits, before bans and temperature, as the HF backend's ``LandingBias``)."""
        for row, live, index in rows:
            landing = live.settings.landing
            if landing is None or index < landing.start or not live.eos:
                continue
            previous = self._previous_token(row, live, index)
            if previous is not None and previous in live.sentence_ends:
                logits[row, list(live.eos)] += landing.bonus(index)

    def _previous_token(self, row: int, live: _Live, index: int) -> int | None:
        """The token before output ``index`` of the request in logits row ``row``."""
        landing = live.settings.landing
        if index == 0 and landing is not None:
            return landing.last_token
        if live.output is not None:  # V1: vLLM's live list of output tokens
            return int(live.output[index - 1]) if 0 < index <= len(live.output) else None
        if self.req_states is not None and live.slot is not None:  # V2: the last sampled token per slot
            return int(self.req_states.last_sampled_tokens[live.slot, 0])
        return None

    def _early(self, logits: torch.Tensor, rows: list[tuple[int, _Live, int]]) -> None:
        """Feed each early trigger this step's distribution (before bans and masking, as on the HF backend);
        a row that fires starts its schedule (and widening) at this position."""
        groups: dict[tuple[int, ...], list[tuple[int, _Live, int]]] = {}
        for item in rows:
            if item[1].history is not None:
                groups.setdefault(item[1].eos, []).append(item)
        for eos, members in groups.items():  # one softmax per set of EOS ids (usually one set per batch)
            picked = torch.tensor([row for row, _, _ in members], device=logits.device)
            ids = torch.tensor(eos or (0,), device=logits.device)
            entropy_needed = any(
                live.settings.early is not None and live.settings.early.entropy_slope is not None
                for _, live, _ in members
            )
            eos_probs, entropies = _trigger_stats(logits.index_select(0, picked), ids, entropy_needed)
            if not eos:
                eos_probs = [0.0] * len(members)
            for (_, live, index), eos_prob, entropy in zip(members, eos_probs, entropies):
                assert live.history is not None and live.settings.early is not None
                if live.history.update(live.settings.early.at + index, eos_prob, entropy):
                    live.started = index

    @staticmethod
    def _truncate(logits: torch.Tensor, rows: list[tuple[int, _Live, int]]) -> None:
        """Top-k / top-p / min-p of requests with ``widen``, which vLLM does not truncate itself (see
        :class:`~perpetual_logits.vllm.settings.WideningSettings`)."""
        todo: list[tuple[int, float, int, float, float]] = []
        vocab = logits.shape[-1]
        for row, live, index in rows:
            s = live.settings
            widen = s.widen
            if widen is None or s.schedule is None or widen.configured.temperature < _GREEDY_BELOW:
                continue  # greedy decoding: truncation never changes the argmax
            w = 0.0
            if live.started is not None and s.schedule.active(index - live.started):
                w = widen.weight(index - live.started)
            top_k, top_p, min_p = widen.values(w, vocab)
            if top_k or top_p < 1.0 or min_p > 0.0:
                todo.append((row, widen.configured.temperature, top_k, top_p, min_p))
        if not todo:
            return
        picked = torch.tensor([t[0] for t in todo], device=logits.device)
        view = logits.index_select(0, picked).float()
        view = view / torch.tensor([t[1] for t in todo], device=logits.device, dtype=torch.float32)[:, None]
        kept = vllm_truncation(
            view,
            torch.tensor([t[2] for t in todo], device=logits.device),
            torch.tensor([t[3] for t in todo], device=logits.device, dtype=torch.float32),
            torch.tensor([t[4] for t in todo], device=logits.device, dtype=torch.float32),
        )
        sub = logits.index_select(0, picked).masked_fill(~kept, float("-inf"))
        logits.index_copy_(0, picked, sub)

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
            if not live.eos:  # every EOS id was outside the vocabulary: EOS can never come, nothing to evict
                continue
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
            live = self._new(params, len(output) if output is not None else 0)
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
        live.slot = req_idx
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
PerpetualLogitsProcessor.__doc__ = """Our vLLM logits processor (Methods 1-2, the driver's temperature, bans, early
triggers and widening).

Register it with ``vllm.LLM(..., logits_processors=[PerpetualLogitsProcessor])`` (or use
:func:`perpetual_logits.vllm.LLM`), then ask for it per request through ``SamplingParams(extra_args=...)``,
built with :func:`~perpetual_logits.vllm.suppress_eos` or :func:`~perpetual_logits.vllm.resample_eos`.
Requests without our key are left untouched. See :class:`_ProcessorCore` for the rules."""


_BY_VOCABULARY: dict[int, Any] = {}
_VOCAB_CLASS = "PerpetualLogitsProcessor_vocab"


def processor_for_vocabulary(vocab_size: int) -> Any:
    """:class:`PerpetualLogitsProcessor` for a model with ``vocab_size`` ids: the same processor, whose
    admission check (``validate_params``, which vLLM calls with the request alone) also refuses token ids
    outside the vocabulary. :func:`perpetual_logits.vllm.LLM` registers it.

    The class is named after the size, and this module builds it again on import by that name, so vLLM's
    worker processes can unpickle it.

    Example:

    ```python
    >>> cls = processor_for_vocabulary(100)
    >>> cls.__name__, cls.vocab_size, issubclass(cls, PerpetualLogitsProcessor)
    ('PerpetualLogitsProcessor_vocab100', 100, True)

    ```
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be an int >= 1, got {vocab_size!r}")
    found = _BY_VOCABULARY.get(vocab_size)
    if found is None:
        name = f"{_VOCAB_CLASS}{vocab_size}"
        found = types.new_class(name, (PerpetualLogitsProcessor,), {})
        found.__module__, found.__qualname__ = __name__, name
        found.vocab_size = vocab_size  # type: ignore[attr-defined]
        found.__doc__ = f"PerpetualLogitsProcessor for a vocabulary of {vocab_size} ids."
        _BY_VOCABULARY[vocab_size] = found
    return found


def __getattr__(name: str) -> Any:
    """Unpickling support: ``PerpetualLogitsProcessor_vocab<N>`` resolves to :func:`processor_for_vocabulary`."""
    digits = name.removeprefix(_VOCAB_CLASS)
    if name.startswith(_VOCAB_CLASS) and digits.isdigit():
        return processor_for_vocabulary(int(digits))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
