"""Methods 3 and 4: backstep generation with an exact KV-cache rewind.

When a row samples EOS, the loop removes that row's last ``n_remove`` generated tokens, rewinds its part of
the KV cache and continues from the shorter sequence (Method 3). With a ``schedule`` the row also samples
hotter right after the rewind and cools back to the configured temperature by the position where EOS was
(Method 4).

How the rewind works (one design for batch size 1 and for batches):

* **Slots.** The cache is a rectangle of slots, one per forward. A row's removed tokens are *masked* in the
  attention mask (per row), and the row's next token goes into a new slot with the position id it has in
  the row's compacted sequence, so attention and RoPE see exactly the kept sequence. Trailing slots that no
  row uses any more are cropped off the cache, so at batch size 1 the cache simply shrinks.
* **No wasted forward.** The raw logits of each row's recent positions are kept in a ring buffer
  (``logits_buffer`` positions). After a rewind to position ``p`` the next token is sampled from the stored
  logits for ``p``: no token is re-fed. Only when rewinds stack deeper than the buffer does a rewind re-feed
  the token before ``p`` (a *deep* rewind, flagged in its event).
* **Hold-back.** Tokens more than ``hold_back`` positions behind a row's end are final: they are streamed
  and never removed, so a streamer only ever receives tokens that stay. A rewind removes
  ``min(n_remove, tokens not yet final)``; it never reaches into the prompt.

Forward passes, exactly: at batch size 1, decode-phase forwards = final new tokens + removed tokens + deep
rewinds - 1 - phrase rewinds. Every kept or removed token is fed once, except the last token of the run
(stock ``generate()`` never feeds it either) and the token that completes a banned phrase (it is removed
before it is fed). In a batch the rows share forwards.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import _validation
from .phrases import PhraseMatcher, default_end_phrases
from .processors import eos_probability, factor_table, multipliers
from .schedules import LinearDecay, Schedule
from .triggers import EarlyTrigger

__all__ = ["BackstepConfig", "BackstepEvent", "BackstepOutput", "BackstepStats"]

_EXHAUSTED = ("suppress", "stop")


@dataclass(frozen=True)
class BackstepConfig:
    """Settings of backstep generation (Methods 3 and 4), passed as ``model.generate(..., backstep=...)``.

    Args:
        n_remove (`int`, defaults to 10): generated tokens removed when a row samples EOS.
        schedule (`Schedule`, *optional*): temperature multiplier after each rewind, by steps since the rewind
            (the first regenerated token is step 0). ``None`` is Method 3; ``LinearDecay(2.0, n_remove)`` is
            the blog's Method 4 (see :meth:`dynamic`).
        max_backsteps (`int`, defaults to 50): rewinds allowed per row; bounds the extra work.
        on_exhausted (`str`, defaults to `"suppress"`): what a row does with EOS once its rewinds are spent:
            ``"suppress"`` masks EOS like Method 1 (the row writes until ``max_new_tokens``), ``"stop"`` lets
            the row end at its next EOS.
        ban_rewound_token (`bool`, *optional*): forbid, at the rewind point, the token that began the removed
            span, so the row must take another path. ``None`` (default) bans under greedy decoding, where a
            plain rewind would regenerate the same tokens, and does not ban when sampling (the blog's rule).
        hold_back (`int`, *optional*): how many of a row's newest tokens stay revisable. Older tokens are final:
            streamed and never removed. Defaults to ``2 * n_remove`` (two rewinds can stack).
        logits_buffer (`int`, *optional*): positions of raw logits kept per row so that a rewind needs no
            forward pass. Defaults to ``n_remove + 1``; a rewind deeper than the buffer re-feeds one token.
        ban_phrases (`"default"` or `list[str | re.Pattern]`, *optional*): ending control beyond the EOS token.
            When a row's decoded text completes one of these phrases -- whatever tokens spelled it -- the row is
            rewound to the token where the phrase began, that token is forbidden there, and generation goes on
            (with the schedule, if any). ``"default"`` is :func:`~perpetual_logits.default_end_phrases` of the
            tokenizer: the text of every special token that ends generation plus common ending phrases. Needs
            ``generate(..., tokenizer=tokenizer)``.
        max_phrase_rewinds (`int`, defaults to 200): phrase rewinds allowed per row (a budget of their own, so
            that phrases are still caught after the EOS budget is spent); afterwards phrases are kept.
        early_trigger (`EarlyTrigger`, *optional*): start the ``schedule`` before EOS is sampled, when a row's
            EOS probability (averaged over a window) or its entropy trend says an ending is near. The
            statistics are those of the model's raw next-token distribution. Needs a ``schedule``.

    Example:

    ```python
    >>> from perpetual_logits import BackstepConfig, LinearDecay
    >>> BackstepConfig(n_remove=5)
    BackstepConfig(n_remove=5, schedule=None, max_backsteps=50, on_exhausted='suppress',
                   ban_rewound_token=None, hold_back=10, logits_buffer=6, ban_phrases=None, max_phrase_rewinds=200,
                   early_trigger=None)
    >>> BackstepConfig.dynamic(n_remove=4, peak=2.0).schedule
    LinearDecay(peak=2.0, steps=4)
    >>> BackstepConfig(n_remove=0)
    Traceback (most recent call last):
    ...
    ValueError: `n_remove` must be an int >= 1, got 0

    ```
    """

    n_remove: int = 10
    schedule: Schedule | None = None
    max_backsteps: int = 50
    on_exhausted: Literal["suppress", "stop"] = "suppress"
    ban_rewound_token: bool | None = None
    hold_back: int | None = None
    logits_buffer: int | None = None
    ban_phrases: Literal["default"] | Sequence[str | re.Pattern[str]] | None = None
    max_phrase_rewinds: int = 200
    early_trigger: EarlyTrigger | None = None

    def __post_init__(self) -> None:
        _validation.positive_int(self.n_remove, "n_remove")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(
                f"`schedule` must be None or a perpetual_logits Schedule (e.g. LinearDecay(2.0, n_remove)), "
                f"got {self.schedule!r}"
            )
        _validation.positive_int(self.max_backsteps, "max_backsteps", minimum=0)
        if self.on_exhausted not in _EXHAUSTED:
            raise ValueError(f"`on_exhausted` must be 'suppress' or 'stop', got {self.on_exhausted!r}")
        if self.ban_rewound_token is not None and not isinstance(self.ban_rewound_token, bool):
            raise ValueError(f"`ban_rewound_token` must be None or a bool, got {self.ban_rewound_token!r}")
        if self.hold_back is None:
            object.__setattr__(self, "hold_back", 2 * self.n_remove)
        hold_back = _validation.positive_int(self.hold_back, "hold_back")
        if hold_back < self.n_remove:
            raise ValueError(f"`hold_back` must be >= n_remove ({self.n_remove}), got {hold_back}")
        if self.logits_buffer is None:
            object.__setattr__(self, "logits_buffer", self.n_remove + 1)
        _validation.positive_int(self.logits_buffer, "logits_buffer")
        _validation.positive_int(self.max_phrase_rewinds, "max_phrase_rewinds", minimum=0)
        phrases = self.ban_phrases
        if phrases is not None and phrases != "default":
            if isinstance(phrases, (str, bytes, re.Pattern)) or not isinstance(phrases, Sequence) or not phrases:
                raise ValueError(
                    "`ban_phrases` must be None, 'default' or a non-empty list of strings / compiled regular "
                    f"expressions, got {phrases!r}"
                )
            for phrase in phrases:
                if not isinstance(phrase, (str, re.Pattern)) and type(phrase).__name__ != "Pattern":
                    raise ValueError(f"`ban_phrases` must contain strings or compiled patterns, got {phrase!r}")
            object.__setattr__(self, "ban_phrases", tuple(phrases))
        if self.early_trigger is not None:
            if not isinstance(self.early_trigger, EarlyTrigger):
                raise ValueError(f"`early_trigger` must be None or an EarlyTrigger, got {self.early_trigger!r}")
            if self.schedule is None:
                raise ValueError("`early_trigger` starts the temperature schedule: set `schedule` too")

    @classmethod
    def dynamic(cls, n_remove: int = 10, peak: float = 2.0, **kwargs: Any) -> BackstepConfig:
        """Method 4 as in the blog: ``peak`` right after the rewind, linearly back to 1.0 where EOS was."""
        return cls(n_remove=n_remove, schedule=LinearDecay(peak, n_remove), **kwargs)


@dataclass(frozen=True)
class BackstepEvent:
    """One rewind of one row.

    Attributes:
        step: decoding step (loop iteration, from 0) at which the row sampled EOS.
        position: generated tokens the row kept, i.e. the generated index where regeneration starts.
        removed: tokens removed (fewer than ``n_remove`` near the prompt or the final tokens; 0 means the EOS
            was only evicted).
        eos_prob: probability of the EOS ids in the distribution that produced the EOS.
        deep: the buffer did not reach back far enough and one token was re-fed (one extra forward).
        banned_token: the token forbidden at ``position`` (``ban_rewound_token``, or a phrase's first token).
        reason: ``"eos"`` (EOS was sampled) or ``"phrase"`` (a banned phrase was completed).
        phrase: the banned phrase that was completed, for ``reason="phrase"``.
    """

    step: int
    position: int
    removed: int
    eos_prob: float
    deep: bool = False
    banned_token: int | None = None
    reason: Literal["eos", "phrase"] = "eos"
    phrase: str | None = None


@dataclass
class BackstepStats:
    """Work counters of one backstep generation (used by tests and benchmarks)."""

    prefill_forwards: int = 0
    decode_forwards: int = 0
    removed_tokens: int = 0
    deep_rewinds: int = 0
    backsteps: int = 0
    cache_slots: int = 0
    early_triggers: int = 0


# The output field was renamed from `past_key_values` to `cache` after transformers 5.18.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(GenerateDecoderOnlyOutput)} else "past_key_values"


@dataclass
class BackstepOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus, per row, the backstep events and the run's work counters."""

    backstep_events: list[list[BackstepEvent]] | None = None
    backstep_stats: BackstepStats | None = None
    early_triggers: list[list[int]] | None = None


class RowTemperature(LogitsProcessor):
    """Divides each row's scores by its own multiplier (Method 4); the loop sets :attr:`factors` each step."""

    def __init__(self) -> None:
        self.factors: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.factors is None:
            return scores
        return scores / self.factors.to(scores.dtype)[:, None]  # type: ignore[return-value]


_WARPERS: tuple[type, ...] = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
)


def _with_row_temperature(processors: LogitsProcessorList, row_temp: RowTemperature) -> LogitsProcessorList:
    """Insert ``row_temp`` just before the sampling warpers.

    There the multiplier composes with the configured temperature, is applied before top-p/min-p measure
    mass, and does not change additive processors (sequence bias) that run earlier.
    """
    items = list(processors)
    index = next((i for i, p in enumerate(items) if isinstance(p, _WARPERS)), len(items))
    if index == len(items) and items and type(items[-1]).__name__ == "LogitNormalization":
        index -= 1
    items.insert(index, row_temp)
    return LogitsProcessorList(items)


def check_cache(cache: Any) -> None:
    """Refuse caches that cannot be rewound exactly."""
    if cache is None:
        raise ValueError("backstep generation needs a KV cache: do not pass use_cache=False")
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"backstep generation needs a transformers Cache, got {type(cache).__name__}")
    for layer in layers:
        name = type(layer).__name__
        if "Quantized" in name:
            raise ValueError(
                f"backstep generation cannot rewind a quantized cache ({name}): quantized layers are not "
                "croppable. Use the default DynamicCache or a StaticCache."
            )
        if hasattr(layer, "max_cache_len") and not getattr(cache, "is_croppable", False):
            raise ValueError(
                f"backstep generation cannot rewind {name} with this transformers version: its fixed-size layers "
                "are not croppable, so rewound slots would overflow the cache. Use the default DynamicCache, or "
                "transformers >= 5.24 for StaticCache."
            )
        if getattr(layer, "is_linear", False) or "Linear" in name:
            raise ValueError(
                f"backstep generation cannot rewind {name}: recurrent/linear-attention state has no per-token "
                "entries to remove."
            )


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    uses_sliding = layer_types is None or any("sliding" in str(t) for t in layer_types)
    if isinstance(window, int) and window > 0 and uses_sliding:
        return window
    return None


class BackstepLoop:
    """One backstep generation: the state of every row and the decoding loop.

    Built and run by :class:`~perpetual_logits.PerpetualGenerationMixin` inside ``generate()``; not meant to
    be used directly.
    """

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: Any,
        streamer: Any,
        model_kwargs: dict[str, Any],
        config: BackstepConfig,
    ) -> None:
        gc = generation_config
        self.model = model
        self.config = config
        self.gc = gc
        self.device = input_ids.device
        self.batch, self.prompt_length = input_ids.shape
        if input_ids.dim() != 2:
            raise ValueError("backstep generation supports 2-D input_ids (batch, length) only")
        if model.config.is_encoder_decoder:
            raise ValueError("backstep generation supports decoder-only models only")
        if gc.output_attentions or gc.output_hidden_states:
            raise ValueError(
                "backstep generation does not record attentions or hidden states; "
                "use output_scores / output_logits instead"
            )
        eos = gc._eos_token_tensor
        if eos is None or eos.numel() == 0:
            raise ValueError(
                "backstep generation needs an EOS token: set eos_token_id in the generation config or call"
            )
        self.eos = eos.reshape(-1).to(self.device)
        self.eos_set = set(self.eos.tolist())
        pad = gc._pad_token_tensor
        self.pad = int(pad.reshape(-1)[0]) if pad is not None else int(self.eos[0])
        if streamer is not None and self.batch > 1:
            raise ValueError("backstep generation streams batch size 1 only (like TextStreamer)")
        self.streamer = streamer
        self.max_length = int(gc.max_length)
        if not model_kwargs.get("use_cache", True):
            raise ValueError("backstep generation needs use_cache=True: the rewind works on the KV cache")
        window = _sliding_window(model.config)
        worst = self.max_length + config.max_backsteps * (config.n_remove + 1) + 1
        if window is not None and worst > window:
            raise ValueError(
                f"backstep generation with sliding-window attention (window {window}) is supported only while "
                f"every cache slot stays inside the window: prompt + max_new_tokens + "
                f"max_backsteps * (n_remove + 1) = {worst} > {window}. Lower max_new_tokens or max_backsteps."
            )
        self.do_sample = bool(gc.do_sample)
        ban = config.ban_rewound_token
        self.ban_rewound = (not self.do_sample) if ban is None else ban

        self.row_temp: RowTemperature | None = None
        processors = LogitsProcessorList(list(logits_processor))
        if config.schedule is not None:
            self.row_temp = RowTemperature()
            processors = _with_row_temperature(processors, self.row_temp)
            self.table = factor_table(config.schedule)
        self.processors = processors
        for proc in processors:
            if callable(getattr(proc, "start", None)):
                proc.start(self.batch, self.prompt_length)
            elif callable(getattr(proc, "reset", None)):
                proc.reset()
        self.rewinders = [p for p in processors if callable(getattr(p, "rewind", None))]
        # Length and EOS are handled per row here; every other criterion sees the compacted sequences.
        self.criteria = StoppingCriteriaList(
            [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        )
        tokenizer = model_kwargs.pop("tokenizer", None)
        model_kwargs.pop("assistant_tokenizer", None)
        self.matcher: PhraseMatcher | None = None
        if config.ban_phrases is not None:
            if tokenizer is None:
                raise ValueError(
                    "`ban_phrases` needs the tokenizer to read the text: call generate(..., tokenizer=tokenizer)"
                )
            phrases = (
                default_end_phrases(tokenizer, self.eos.tolist())
                if config.ban_phrases == "default"
                else list(config.ban_phrases)
            )
            self.matcher = PhraseMatcher(phrases, tokenizer)
        self.early = config.early_trigger
        if self.early is not None:
            self.early.reset()
        self.model_kwargs = model_kwargs
        self.input_ids = input_ids

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> BackstepOutput | torch.Tensor:
        model, gc, cfg = self.model, self.gc, self.config
        B, P = self.batch, self.prompt_length
        kwargs = self.model_kwargs
        cache_key = "cache" if "cache" in kwargs else "past_key_values"
        check_cache(kwargs.get(cache_key))
        prompt_mask = kwargs.get("attention_mask")
        input_ids = self.input_ids

        stats = BackstepStats(prefill_forwards=1)
        self.stats = stats
        outputs = model._prefill(input_ids, gc, kwargs, is_first_iteration=not gc.is_assistant)
        kwargs = model._update_model_kwargs_for_generation(outputs, kwargs, is_encoder_decoder=False)
        cache = kwargs[cache_key]
        if cache.get_seq_length() != P:
            raise ValueError("backstep generation cannot continue from a pre-filled cache; pass a fresh prompt")
        self.cache = cache
        self.cache_key = cache_key
        self.extra = {
            k: v
            for k, v in kwargs.items()
            if k not in ("cache", "past_key_values", "attention_mask", "position_ids", "inputs_embeds", "use_cache")
        }
        self.forward = (
            model.get_compiled_call(gc.compile_config)
            if model._valid_auto_compile_criteria(kwargs, gc)
            else model.__call__
        )

        # Per-row state (Python lists: rows move independently, and the batch is small).
        prompt_rows = input_ids.tolist()
        if prompt_mask is not None:
            mask = prompt_mask.to(self.device, torch.long)
            self.prompt_pos = (mask.cumsum(-1) - 1).clamp(min=0).tolist()
            self.valid_prompt = mask.sum(-1).tolist()
            self.attn: torch.Tensor | None = mask.clone()
            self.keep_mask = True
            # Leading padding is not text: phrase scans start after it.
            self.text_start = [row.index(1) if 1 in row else P for row in mask.tolist()]
        else:
            self.prompt_pos = [list(range(P))] * B
            self.valid_prompt = [P] * B
            self.attn = None
            self.keep_mask = False
            self.text_start = [0] * B
        self.width = P  # cache slots
        self.tok = torch.full((B, self.max_length + 1), self.pad, dtype=torch.long, device=self.device)
        self.tok[:, :P] = input_ids
        self.row_ids: list[list[int]] = prompt_rows  # each row's tokens, prompt included (mirrors self.tok)
        self.lens = [P] * B
        self.slot_of: list[list[int]] = [list(range(P)) for _ in range(B)]
        self.committed = [P] * B
        self.phrase_hold = [0] * B
        self.finished = [self.max_length <= P] * B
        self.used = [0] * B  # EOS rewinds per row
        self.phrase_rewinds = [0] * B
        self.trigger: list[int | None] = [None] * B
        self.bans: list[dict[int, set[int]]] = [{} for _ in range(B)]
        self.mode = ["feed"] * B  # feed | wait | refeed
        self.events: list[list[BackstepEvent]] = [[] for _ in range(B)]
        self.early_positions: list[list[int]] = [[] for _ in range(B)]
        self.row_steps: list[list[int]] = [[] for _ in range(B)]
        record_scores = bool(gc.return_dict_in_generate and gc.output_scores)
        record_logits = bool(gc.return_dict_in_generate and gc.output_logits)
        step_scores: list[torch.Tensor] = []
        step_logits: list[torch.Tensor] = []

        raw = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.device)
        del outputs
        vocab = raw.shape[-1]
        cap = int(cfg.logits_buffer)  # type: ignore[arg-type]
        self.cap = cap
        self.buffer = torch.empty((cap, B, vocab), dtype=torch.float32, device=self.device)
        self.buffer_pos = [[-1] * cap for _ in range(B)]
        self._store(raw, list(range(B)))
        fed = [True] * B

        model._perpetual_loop = self  # lets criteria read live event counts (event_counts)
        optimize = getattr(model, "_optimize_model_for_decode", None)
        context = optimize() if optimize is not None else contextlib.nullcontext()
        step = 0
        try:
            with context:
                while not all(self.finished):
                    active = [b for b in range(B) if not self.finished[b]]
                    current = self._current_logits(raw, fed, active)
                    if self.early is not None:
                        self._early_triggers(current, active)
                    if self.row_temp is not None:
                        self.row_temp.factors = self._factors(active)
                    scores = self.processors(cast(torch.LongTensor, self._view()), self._apply_bans(current, active))
                    if record_scores:
                        step_scores.append(scores)
                    if record_logits:
                        step_logits.append(current)
                    if self.do_sample:
                        next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                    else:
                        next_tokens = scores.argmax(-1)
                    chosen = next_tokens.tolist()

                    appended: list[int] = []
                    rewound = False
                    eos_probs: list[float] | None = None
                    for b in active:
                        token = chosen[b]
                        if token in self.eos_set and self.used[b] < cfg.max_backsteps:
                            if eos_probs is None:
                                eos_probs = eos_probability(scores, self.eos).tolist()
                            removed = min(cfg.n_remove, self.lens[b] - self.committed[b])
                            self._rewind(b, step, self.lens[b] - removed, eos_probs[b], "eos")
                            rewound = True
                            continue
                        self._append(b, token, step)
                        if token in self.eos_set:
                            self.finished[b] = True
                        else:
                            appended.append(b)
                    if appended and self.matcher is not None:
                        rewound |= self._scan_phrases(appended, step)
                    if rewound:
                        self._trim()
                    if appended:
                        self._check_stops(appended, scores)
                    self._stream()

                    fed = self._forward_inputs(active)
                    if any(fed):
                        raw = self._run_forward(fed)
                        stats.decode_forwards += 1
                    step += 1
        finally:
            model._perpetual_loop = None

        if self.streamer is not None:
            self.streamer.end()
        stats.cache_slots = self.width
        stats.backsteps = sum(len(e) for e in self.events)
        return self._outputs(step_scores, step_logits, record_scores, record_logits, stats)

    def event_counts(self) -> list[int]:
        """Rewinds so far (EOS and phrase), per row (for :class:`~perpetual_logits.EvictionBudgetCriteria`)."""
        return [len(events) for events in self.events]

    # -- pieces of a step ----------------------------------------------------------------------------------
    def _store(self, raw: torch.Tensor, rows: list[int]) -> None:
        """Keep the raw logits of ``rows``, which predict position ``lens[row]``."""
        for b in rows:
            pos = self.lens[b]
            slot = pos % self.cap
            self.buffer[slot, b] = raw[b]
            self.buffer_pos[b][slot] = pos

    def _current_logits(self, raw: torch.Tensor, fed: list[bool], active: list[int]) -> torch.Tensor:
        """Raw logits for the position each active row chooses: fresh from the forward, or from the buffer."""
        waiting = [b for b in active if not fed[b]]
        if not waiting:
            return raw
        current = raw.clone()
        for b in waiting:
            current[b] = self.buffer[self.lens[b] % self.cap, b]
        return current

    def _view(self) -> torch.Tensor:
        """The rows right-aligned (left-padded) as processors and criteria expect them."""
        longest = max(self.lens)
        if min(self.lens) == longest:
            return self.tok[:, :longest]
        lens = torch.tensor(self.lens, device=self.device)
        index = torch.arange(longest, device=self.device)[None, :] + (lens[:, None] - longest)
        view = self.tok.gather(1, index.clamp(min=0))
        return view.masked_fill(index < 0, self.pad)

    def _early_triggers(self, logits: torch.Tensor, active: list[int]) -> None:
        """Start the schedule of rows whose statistics announce an ending (before EOS is sampled)."""
        assert self.early is not None
        fired = self.early.update_from_scores(logits, self.eos.tolist()).tolist()
        for b in active:
            if fired[b]:
                self.trigger[b] = self.lens[b]
                self.early_positions[b].append(self.lens[b] - self.prompt_length)
                self.stats.early_triggers += 1

    def _factors(self, active: list[int]) -> torch.Tensor | None:
        schedule = self.config.schedule
        assert schedule is not None
        steps = [0] * self.batch
        on = [False] * self.batch
        for b in active:
            start = self.trigger[b]
            if start is not None and schedule.is_active(self.lens[b] - start):
                steps[b] = self.lens[b] - start
                on[b] = True
        if not any(on):
            return None
        steps_t, on_t = torch.tensor(steps, device=self.device), torch.tensor(on, device=self.device)
        return multipliers(self.table, steps_t, on_t, forever=schedule.length is None)

    def _apply_bans(self, logits: torch.Tensor, active: list[int]) -> torch.Tensor:
        """Forbid tokens per row before the processors, so top-k/top-p pick among the rest.

        A row whose every finite logit would be banned keeps its logits (never NaN).
        """
        pairs: list[tuple[int, int]] = []
        for b in active:
            banned = self.bans[b].get(self.lens[b])
            if banned:
                pairs.extend((b, t) for t in banned)
            if self.used[b] >= self.config.max_backsteps and self.config.on_exhausted == "suppress":
                pairs.extend((b, t) for t in self.eos_set)
        if not pairs:
            return logits
        rows = torch.tensor([r for r, _ in pairs], device=self.device)
        cols = torch.tensor([c for _, c in pairs], device=self.device)
        masked = logits.index_put((rows, cols), torch.tensor(float("-inf"), device=self.device))
        has_other = torch.isfinite(masked).any(-1, keepdim=True)
        return torch.where(has_other, masked, logits)

    def _append(self, b: int, token: int, step: int) -> None:
        self.tok[b, self.lens[b]] = token
        self.row_ids[b].append(token)
        self.lens[b] += 1
        self.row_steps[b].append(step)
        self.mode[b] = "feed"
        if self.lens[b] >= self.max_length:
            self.finished[b] = True

    def _scan_phrases(self, rows: list[int], step: int) -> bool:
        """Rewind rows whose newest token completed a banned phrase; remember how much text to hold back."""
        assert self.matcher is not None
        rewound = False
        for b in rows:
            start = self.text_start[b]
            at_end = self.finished[b]  # max_new_tokens reached: no token follows to confirm a pending match
            scan = self.matcher.scan(self.row_ids[b][start:], self.prompt_length - start, 1, final=at_end)
            self.phrase_hold[b] = scan.hold
            match = scan.match
            if match is None or self.phrase_rewinds[b] >= self.config.max_phrase_rewinds:
                continue
            target = max(match.start + start, self.committed[b])
            self.finished[b] = False
            self._rewind(b, step, target, None, "phrase", match.phrase)
            rewound = True
        return rewound

    def _rewind(
        self,
        b: int,
        step: int,
        p: int,
        eos_prob: float | None,
        reason: Literal["eos", "phrase"],
        phrase: str | None = None,
    ) -> None:
        """Cut row ``b`` back to ``p`` tokens: mask the removed slots, forbid what must not come again."""
        cfg = self.config
        end = self.lens[b]
        removed = end - p
        slots = self.slot_of[b]
        deep = not self._buffered(b, p)
        doomed = slots[p - 1 if deep else p : end]  # deep: the token before p is fed again in a new slot
        if doomed:
            if self.attn is None:
                self.attn = torch.ones((self.batch, self.width), dtype=torch.long, device=self.device)
            self.attn[b, torch.tensor(doomed, device=self.device)] = 0
        del slots[p - 1 if deep else p :]
        first_removed = self.row_ids[b][p] if removed > 0 else None
        del self.row_ids[b][p:]
        self.lens[b] = p
        del self.row_steps[b][p - self.prompt_length :]
        for i, pos in enumerate(self.buffer_pos[b]):
            if pos > p:
                self.buffer_pos[b][i] = -1
        self.mode[b] = "refeed" if deep else "wait"

        bans = {pos: toks for pos, toks in self.bans[b].items() if pos <= p}
        here = bans.setdefault(p, set())
        here.update(self.eos_set)  # the regenerated token must not end the row at once
        banned_token = None
        if first_removed is not None and (reason == "phrase" or self.ban_rewound):
            banned_token = first_removed
            here.add(banned_token)
        self.bans[b] = bans
        if cfg.schedule is not None:
            self.trigger[b] = p
        if reason == "eos":
            self.used[b] += 1
        else:
            self.phrase_rewinds[b] += 1
        self.phrase_hold[b] = 0
        if eos_prob is None:
            eos_prob = float(eos_probability(self.buffer[p % self.cap, b][None], self.eos)[0]) if not deep else 0.0
        self.stats.removed_tokens += removed
        self.stats.deep_rewinds += int(deep)
        event = BackstepEvent(step, p - self.prompt_length, removed, eos_prob, deep, banned_token, reason, phrase)
        self.events[b].append(event)
        if self.early is not None:
            # Its history holds one step per position chosen since p (and the EOS step itself).
            self.early.rewind(b, removed + (1 if reason == "eos" else 0))
        for proc in self.rewinders:
            proc.rewind(b, p)

    def _buffered(self, b: int, pos: int) -> bool:
        return self.buffer_pos[b][pos % self.cap] == pos

    def _trim(self) -> None:
        """Crop trailing cache slots that no row uses any more (at batch size 1: the removed tokens)."""
        if self.attn is None:
            return
        used = self.attn.any(0).nonzero()
        keep = int(used[-1]) + 1 if used.numel() else 0
        drop = self.width - keep
        if drop > 0 and getattr(self.cache, "is_croppable", False):
            self.cache.crop(-drop)
            self.attn = self.attn[:, :keep]
            self.width = keep
        if not self.keep_mask and bool(self.attn.all()):
            self.attn = None  # back to the fast path without a mask

    def _check_stops(self, rows: list[int], scores: torch.Tensor) -> None:
        if not len(self.criteria):
            return
        done = self.criteria(self._view(), scores).tolist()
        for b in rows:
            if done[b]:
                self.finished[b] = True

    def _stream(self) -> None:
        hold_back = int(self.config.hold_back)  # type: ignore[arg-type]
        for b in range(self.batch):
            hold = max(hold_back, self.phrase_hold[b])
            target = self.lens[b] if self.finished[b] else max(self.committed[b], self.lens[b] - hold)
            if target > self.committed[b]:
                if self.streamer is not None:
                    self.streamer.put(self.tok[b, self.committed[b] : target].cpu())
                self.committed[b] = target

    def _forward_inputs(self, active: list[int]) -> list[bool]:
        """Which rows feed a real token in the next forward: active rows that are not waiting on the buffer."""
        fed = [False] * self.batch
        for b in active:
            fed[b] = not self.finished[b] and self.mode[b] != "wait"
        return fed

    def _position(self, b: int, index: int) -> int:
        if index < self.prompt_length:
            return int(self.prompt_pos[b][index])
        return int(self.valid_prompt[b]) + index - self.prompt_length

    def _run_forward(self, fed: list[bool]) -> torch.Tensor:
        B = self.batch
        tokens = [self.pad] * B
        positions = [0] * B
        for b in range(B):
            if not fed[b]:
                continue
            index = self.lens[b] - 1  # feed: the newest token; refeed: the token before the rewind point
            tokens[b] = self.row_ids[b][index]
            positions[b] = self._position(b, index)
            slots = self.slot_of[b]
            if len(slots) == index:
                slots.append(self.width)
            else:
                slots[index] = self.width
            self.mode[b] = "feed"
        if self.attn is not None or not all(fed):
            if self.attn is None:
                self.attn = torch.ones((B, self.width), dtype=torch.long, device=self.device)
            column = torch.tensor(fed, dtype=torch.long, device=self.device)[:, None]
            self.attn = torch.cat([self.attn, column], dim=-1)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        model_inputs = self.model.prepare_inputs_for_generation(
            ids,
            next_sequence_length=1,
            attention_mask=self.attn,
            position_ids=torch.tensor(positions, device=self.device)[:, None],
            use_cache=True,
            **{self.cache_key: self.cache},  # `past_key_values` up to transformers 5.18
            **self.extra,
        )
        outputs = self.forward(**model_inputs, return_dict=True)
        self.width += 1
        raw = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.device)
        self._store(raw, [b for b in range(B) if fed[b]])
        return raw

    def _outputs(
        self,
        step_scores: list[torch.Tensor],
        step_logits: list[torch.Tensor],
        record_scores: bool,
        record_logits: bool,
        stats: BackstepStats,
    ) -> BackstepOutput | torch.Tensor:
        longest = max(self.lens)
        sequences = self.tok[:, :longest].clone()
        for b in range(self.batch):
            sequences[b, self.lens[b] :] = self.pad
        self.model.last_backstep = (self.events, stats)
        if not self.gc.return_dict_in_generate:
            return sequences

        def gather(per_step: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            generated = longest - self.prompt_length
            filler = torch.zeros_like(per_step[0][0]) if per_step else None
            out = []
            for j in range(generated):
                rows = [per_step[steps[j]][b] if j < len(steps) else filler for b, steps in enumerate(self.row_steps)]
                out.append(torch.stack(rows))  # type: ignore[arg-type]
            return tuple(out)

        return BackstepOutput(
            sequences=cast(torch.LongTensor, sequences),
            scores=cast(Any, gather(step_scores) if record_scores else None),
            logits=cast(Any, gather(step_logits) if record_logits else None),
            attentions=None,
            hidden_states=None,
            **{_CACHE_FIELD: self.cache},
            backstep_events=self.events,
            backstep_stats=stats,
            early_triggers=self.early_positions if self.early is not None else None,
        )
