"""The backstep decoding loop: transformers' ``_sample`` recipe with a rewind step.

Each step: current logits (fresh from the forward, or stored for rows that just rewound) → early triggers and
per-row temperature → bans → processors → select → per row: append, ask the rewind policy (keep, finish or
rewind) → stopping criteria → stream what became final → forward. Why and where a row rewinds is the policy's
call (:class:`~perpetual_logits.backstep.policy.RewindPolicy`, shared with the vLLM driver); a rewind is one
call here: :meth:`BackstepLoop.rewind` tells every unit (:class:`~perpetual_logits.protocol.RowState`) where the
row now ends.

Forward passes, exactly: at batch size 1, decode forwards = final new tokens + removed tokens + deep rewinds - 1.
Every kept or removed token is fed once, except the run's last token (stock ``generate()`` never feeds it
either) and the token that triggers a rewind (a sampled EOS, the token completing a phrase or a loop): it is
refused before it is fed, and not counted as removed. A rewound row draws its next token from the logits
buffer, so the rewind itself costs no forward. In a batch the rows share forwards: a rewound row whose buffer
would serve it feeds its last kept token again in the forward the other rows need anyway, which keeps the cache
free of holes.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation import EosTokenCriteria, MaxLengthCriteria

from .. import _compat
from ..distributions import eos_probability
from ..processor_list import insert_before_warpers, per_row_lengths
from ..protocol import RowState
from .buffer import LogitsRing
from .cache import CacheLayout, check_cache, check_static_size, sliding_window
from .config import BackstepConfig
from .events import BackstepOutput, BackstepStats, RewindEvent
from .landing import LandingBias
from .policy import RewindPlan, RewindPolicy
from .records import StepRecords
from .rows import Rows
from .streaming import HoldBack
from .temperature import TemperatureSchedule
from .window import ContextWindow, model_window

__all__ = ["BackstepLoop"]


class BackstepLoop:
    """One backstep generation: built and run by :class:`~perpetual_logits.PerpetualGenerationMixin` inside
    ``generate()``. Not meant to be used directly.

    All state lives in the units below, each created here and started in :meth:`run`.
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
        tokenizer: Any = None,
    ) -> None:
        gc = generation_config
        _check_supported(model, input_ids, gc, streamer, model_kwargs)
        # -- the call
        self.model = model
        self.config = config
        self.gc = gc
        self.device = input_ids.device
        self.input_ids = input_ids
        self.prompt_mask: torch.Tensor | None = model_kwargs.get("attention_mask")
        self.model_kwargs = model_kwargs
        self.do_sample = bool(gc.do_sample)
        vocab = _vocab_size(model)
        eos = _compat.eos_tensor(gc)
        if eos is None or eos.numel() == 0:
            raise ValueError("backstep generation needs an EOS token: set eos_token_id in the generation config")
        # An EOS id outside the vocabulary can never be sampled: stock generate() ignores it, and so do we.
        self.eos = [int(e) for e in eos.reshape(-1).tolist() if 0 <= int(e) < vocab]
        self.eos_tensor = torch.tensor(self.eos or [0], dtype=torch.long, device=self.device)
        pad = _compat.pad_tensor(gc)
        self.pad = int(pad.reshape(-1)[0]) if pad is not None else int(eos.reshape(-1)[0])
        max_length = int(gc.max_length)
        window = sliding_window(model.config)
        if window is not None and max_length >= window:
            raise ValueError(
                f"backstep generation with sliding-window attention (window {window}) needs the whole run inside "
                f"the window: prompt + max_new_tokens = {max_length} must be < {window}. Lower max_new_tokens."
            )
        self.capacity = max_length if window is None else min(max_length, window - 1)

        # -- why and where rows rewind, what is forbidden, what is final: the backend-neutral policy
        self.policy = RewindPolicy(config, self.eos, vocab, tokenizer, greedy=not self.do_sample)

        # -- units: rows, logits buffer, temperature, streaming, records (the cache comes with the prefill)
        self.rows = Rows(input_ids, self.prompt_mask, max_length, self.pad)
        # A run holds at most max_new_tokens + 1 positions to draw from: a larger buffer (n_remove can be huge)
        # would only allocate memory no rewind can use.
        usable = max_length - self.rows.prompt_length + 1
        self.ring = LogitsRing(min(int(config.logits_buffer), usable), vocab, self.device)  # type: ignore[arg-type]
        self.temperature = (
            TemperatureSchedule(config.schedule, config.early_trigger, self.device, config.widen)
            if config.schedule
            else None
        )
        self.holdback = HoldBack(streamer)
        self.records = StepRecords(
            bool(gc.return_dict_in_generate and gc.output_scores), bool(gc.return_dict_in_generate and gc.output_logits)
        )
        self.cache: CacheLayout | None = None
        self.window: ContextWindow | None = None  # the context shift (built with the cache)
        _check_window(model, config, self.rows.text_start, max_length, self.prompt_mask)

        # -- processors and criteria, as generate() built them, adapted to rows of different lengths
        processors = per_row_lengths(LogitsProcessorList(list(logits_processor)), lambda: self.rows.lens)
        if self.temperature is not None:
            processors = insert_before_warpers(processors, self.temperature.processor)
            if self.do_sample:  # greedy decoding has no truncation to widen: the argmax is unaffected
                processors = self.temperature.widen_truncation(processors, vocab)
        # The landing raises EOS at sentence ends on the raw logits, before temperature and truncation.
        text = self.policy.text
        if text is not None and text.landing is not None:
            processors = LogitsProcessorList([LandingBias(text, self.eos), *processors])
        self.processors = processors
        # Length and EOS are handled per row here; every other criterion sees the rows left-padded.
        self.criteria = StoppingCriteriaList(
            [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        )

        # -- outcome
        self.stats = BackstepStats()

    @property
    def events(self) -> list[list[RewindEvent]]:
        """Each row's rewinds so far (kept by the policy)."""
        return self.policy.events

    # -- the recipe ------------------------------------------------------------------------------------------
    def run(self) -> BackstepOutput | torch.Tensor:
        rows, bans, records = self.rows, self.policy.bans, self.records
        raw = self._prefill()
        self._start()
        self.ring.store(raw, list(range(rows.batch)), rows.lens)
        current = raw
        step = 0
        with _compat.decode_context(self.model):
            while active := rows.active():
                if self.temperature is not None:
                    self.stats.early_triggers += self.temperature.observe(current, active, rows.lens, self.eos)
                    self.temperature.set_factors(active, rows.lens, rows.batch)
                view = cast(torch.LongTensor, rows.right_aligned())
                scores = self.processors(view, bans.apply(current, active, rows.lens))
                records.add_step(scores, current)
                chosen = self._select(scores).tolist()
                appended = [b for b in active if self._take(b, chosen[b], step, current)]
                self._check_stops(appended, scores)
                rows.flush()
                self._settle()
                current = self._forward(current)
                step += 1
        self.holdback.end()
        return self._output()

    # -- steps ---------------------------------------------------------------------------------------------
    def _prefill(self) -> torch.Tensor:
        kwargs = self.model_kwargs
        cache_key = _compat.cache_kwarg(kwargs)
        check_cache(kwargs.get(cache_key))
        outputs = _compat.prefill(self.model, self.input_ids, self.gc, kwargs)
        kwargs = _compat.update_after_prefill(self.model, outputs, kwargs)
        cache = kwargs[cache_key]
        prompt_slots = cache.get_seq_length()
        if kwargs.get("inputs_embeds") is None and prompt_slots != self.input_ids.shape[1]:
            raise ValueError(
                f"backstep generation expected the prompt's {self.input_ids.shape[1]} tokens in the cache after "
                f"the prompt forward, found {prompt_slots}"
            )
        self.cache_key = cache_key
        self.extra = {
            k: v
            for k, v in kwargs.items()
            if k not in ("cache", "past_key_values", "attention_mask", "position_ids", "inputs_embeds", "use_cache")
        }
        self.forward = _compat.decode_forward(self.model, self.gc, kwargs)
        static = [layer.max_cache_len for layer in _compat.cache_layers(cache) if _compat.is_static_layer(layer)]
        prefix = prompt_slots - self.input_ids.shape[1]  # inputs_embeds: max_length counts generated tokens only
        check_static_size(static, self.capacity + prefix, self.rows.batch)
        capacity = min([self.capacity + prefix, *static])
        self.cache = CacheLayout(cache, self.prompt_mask, self.input_ids.shape[1], capacity, self.device)
        if self.config.window is not None:
            if prefix:
                raise ValueError("BackstepConfig(window=...) needs the prompt as input_ids, not inputs_embeds")
            self.window = ContextWindow(
                self.config.window, self.model, self.rows.text_start, self.rows.prompt_length, cache_key
            )
            # A row's slots never pass its left padding + the limit; a wider layout is tightened instead (one more
            # column: a row that finished with a full window takes a masked slot while another row writes).
            self.cache.capacity = min(self.cache.capacity, self.window.limit + max(self.rows.text_start) + 1)
        self.stats.prefill_forwards = 1
        return outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.device)

    def _start(self) -> None:
        batch, prompt = self.rows.batch, self.rows.prompt_length
        for unit in [*self._units(), self.policy]:
            unit.start(batch, prompt)
        self.policy.set_limits([self.rows.max_length] * batch)
        # The user's processors were reset once, by PerpetualGenerationMixin.generate; RowState ones start above.

    def _units(self) -> list[RowState]:
        units: list[RowState] = [self.rows, self.ring, self.records]
        if self.cache is not None:
            units.append(self.cache)
        if self.temperature is not None:
            units.append(self.temperature)
        if self.window is not None:
            units.append(self.window)
        units += [p for p in self.processors if isinstance(p, RowState)]
        return units

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(-1)

    def _take(self, row: int, token: int, step: int, raw: torch.Tensor) -> bool:
        """Append the chosen token and ask the policy: keep, finish or rewind. Returns whether it was kept."""
        rows = self.rows
        rows.append(row, token)
        self.records.add_token(row, step)
        # A prompt given as inputs_embeds has no token to feed again before the first generated position.
        floor = 1 if rows.prompt_length == 0 and not self.ring.has(row, 0) else 0
        if self.window is not None:  # never back into text a context shift dropped
            floor = max(floor, self.window.floor(row))
        decision = self.policy.after_token(rows.view_of(row), floor)
        if decision == "keep":
            return True
        if decision == "finish":
            if token not in self.eos and rows.full(row):
                self._cut_at_limit(row, step)
            self._finish(row)
            return True
        assert isinstance(decision, RewindPlan)
        self.rewind(decision, step, raw)
        return False

    def rewind(self, plan: RewindPlan, step: int, raw: torch.Tensor) -> None:
        """Cut a row back as the policy planned, and tell every unit. ``raw``: this step's raw logits."""
        row, position = plan.row, plan.position
        assert self.cache is not None
        deep = not self.ring.has(row, position)
        # The distribution the refused token was drawn from, before temperature, processors and bans.
        eos_prob = float(eos_probability(raw[row : row + 1], self.eos_tensor)[0]) if self.eos else 0.0
        for unit in self._units():
            unit.rewind(row, position)
        if deep:
            self.cache.drop_last(row)  # the token before `position` is fed again to get its logits
        self.policy.apply(plan, step, eos_prob, deep)
        if plan.restart_schedule and self.temperature is not None:
            self.temperature.restart(row, position)
        self.stats.removed_tokens += plan.removed
        self.stats.deep_rewinds += int(deep)
        self.stats.rewinds += 1

    def _cut_at_limit(self, row: int, step: int) -> None:
        """A row at ``max_new_tokens`` ends where the policy says (no unfinished phrase; with the landing, its last
        complete sentence): the tokens after are dropped like a rewind's, without an event. Tokens the policy
        appends (a sentence end that was inside a token, spelled anew) are not fed: the returned cache ends
        before them, and their scores are those of the token they replace."""
        rows = self.rows
        length = rows.lens[row]
        cut, extra = self.policy.cut_at_limit(rows.view_of(row))
        if cut >= length:
            return
        self.stats.landing_cuts += 1
        self.stats.removed_tokens += length - cut
        steps = self.records.row_steps[row]
        replaced = steps[cut - rows.prompt_length] if cut - rows.prompt_length < len(steps) else step
        # The policy is not told: the row finishes now, and its rules are never asked about it again.
        for unit in self._units():
            unit.rewind(row, cut)
        for token in extra:
            rows.append(row, token)
            self.records.add_token(row, replaced)

    def _finish(self, row: int) -> None:
        for unit in [*self._units(), self.policy]:
            unit.finish(row)

    def _check_stops(self, rows: list[int], scores: torch.Tensor) -> None:
        if not rows or not len(self.criteria):
            return
        done = self.criteria(cast(torch.LongTensor, self.rows.right_aligned()), scores).tolist()
        for b in rows:
            if done[b] and not self.rows.finished[b]:
                self._finish(b)

    def _settle(self) -> None:
        """Make final (and stream) what the policy says can no longer be taken back."""
        rows = self.rows
        for b in range(rows.batch):
            begin, end = self.policy.settle(b, rows.lens[b], rows.finished[b])
            self.holdback.put(rows.tokens, b, begin, end)

    def _forward(self, current: torch.Tensor) -> torch.Tensor:
        """Feed every active row's newest token in one forward; return each row's logits for its next position.

        Rows that rewound to a buffered position need no forward. When no row needs one, none runs and every
        active row draws from the buffer; otherwise such rows feed their last kept token again (the forward
        runs anyway, and the cache keeps one slot per kept token).
        """
        rows, cache, ring = self.rows, self.cache, self.ring
        assert cache is not None
        active = rows.active()
        if not active:
            return current
        waiting = [b for b in active if cache.fed(b) == rows.lens[b]]
        if len(waiting) == len(active):
            out = current.clone()
            for b in waiting:
                out[b] = ring.get(b, rows.lens[b])
            return out
        # A waiting row feeds its last kept token again. Only a prompt given as inputs_embeds has no token to
        # feed before the first generated position: such a row takes a masked padding slot and its buffer.
        stale = [b for b in waiting if rows.lens[b] == 0]
        for b in waiting:
            if rows.lens[b] > 0:
                cache.drop_last(b)
        cache.realign()
        if self.window is not None:
            feeding = {b: rows.lens[b] - 1 for b in active if b not in stale}
            self.window.shift_if_needed(cache, rows.ids, feeding)
        tokens, positions, real = [self.pad] * rows.batch, [0] * rows.batch, [False] * rows.batch
        for b in active:
            if b not in stale:
                index = rows.lens[b] - 1
                tokens[b], positions[b], real[b] = rows.ids[b][index], cache.position(b, index), True
        mask = cache.append_column(real)
        inputs = _compat.step_inputs(
            self.model,
            torch.tensor(tokens, device=self.device)[:, None],
            mask,
            torch.tensor(positions, device=self.device)[:, None],
            self.cache_key,
            cache.cache,
            self.extra,
        )
        outputs = self.forward(**inputs, return_dict=True)
        self.stats.decode_forwards += 1
        raw = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.device)
        fed = [b for b in active if real[b]]
        ring.store(raw, fed, rows.lens)
        for b in stale:
            raw[b] = ring.get(b, rows.lens[b])
            cache.drop_padding(b)
        return raw

    def _output(self) -> BackstepOutput | torch.Tensor:
        rows, records, cache = self.rows, self.records, self.cache
        assert cache is not None
        cache.realign(tight=True)  # the returned cache: no padding columns shared by every row
        self.stats.cache_slots = cache.width
        self.stats.peak_cache_slots = cache.peak_width
        self.stats.realignments = cache.realignments
        self.stats.context_shifts = self.window.shifts if self.window is not None else 0
        sequences = rows.sequences()
        if not self.gc.return_dict_in_generate:
            return sequences
        generated = sequences.shape[1] - rows.prompt_length
        early = self.temperature.early_positions if self.temperature is not None and self.temperature.early else None
        return BackstepOutput(
            sequences=cast(torch.LongTensor, sequences),
            scores=cast(Any, records.per_position(records.scores, generated) if records.record_scores else None),
            logits=cast(Any, records.per_position(records.logits, generated) if records.record_logits else None),
            attentions=None,
            hidden_states=None,
            **{_compat.output_cache_field(): cache.cache},
            backstep_events=self.policy.events,
            backstep_stats=self.stats,
            early_triggers=early,
        )


# -- construction helpers ----------------------------------------------------------------------------------
def _check_supported(model: Any, input_ids: torch.Tensor, gc: Any, streamer: Any, kwargs: dict[str, Any]) -> None:
    if input_ids.dim() != 2:
        raise ValueError("backstep generation supports 2-D input_ids (batch, length) only")
    if model.config.is_encoder_decoder:
        raise ValueError("backstep generation supports decoder-only models only")
    if gc.output_attentions or gc.output_hidden_states:
        raise ValueError(
            "backstep generation does not record attentions or hidden states; use output_scores / output_logits"
        )
    if streamer is not None and input_ids.shape[0] > 1 and not callable(getattr(streamer, "put_row", None)):
        raise ValueError(
            "backstep generation streams batch size 1 only (like TextStreamer), or any batch size to a "
            "row streamer (one with put_row(row, tokens))"
        )
    if not kwargs.get("use_cache", True):
        raise ValueError("backstep generation needs use_cache=True: the rewind works on the KV cache")


def _check_window(
    model: Any, config: BackstepConfig, text_start: list[int], max_length: int, prompt_mask: torch.Tensor | None
) -> None:
    """Without a context shift, warn (one line) when a row may pass the model's window; with one, check that
    positions can be recomputed after a shift (left padding only)."""
    window = model_window(model)
    longest = max_length - min(text_start, default=0)
    if config.window is None:
        if window is not None and longest > window:
            warnings.warn(
                f"backstep generation: a row may reach {longest} positions, past the model's window of {window} "
                "(max_position_embeddings), where text degrades; pass BackstepConfig(window=ContextShift()) to "
                "write on with a bounded cache, or lower max_new_tokens",
                UserWarning,
                stacklevel=2,
            )
        return
    if prompt_mask is not None:
        for row in prompt_mask.tolist():
            text = row[row.index(1) :] if 1 in row else []
            if 0 in text:
                raise ValueError(
                    "BackstepConfig(window=...) needs a left-padded attention_mask (zeros only before the text)"
                )


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)
