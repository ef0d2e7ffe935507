"""The backstep decoding loop: transformers' ``_sample`` recipe with a rewind step.

Building a :class:`BackstepLoop` checks the call, builds the units and runs the prompt forward
(:func:`~perpetual_logits.backstep.prefill.prefill`): the first logits, the cache layout, the decode step and the
context shift exist before the first step, so every unit is whole. :meth:`BackstepLoop.run` starts the units
(:class:`~perpetual_logits.RowState`) and then, each step: current logits (fresh from the forward, or stored for
rows that just rewound) → early triggers and per-row temperature → bans → processors → select → per row: append,
ask the rewind policy (keep, finish or rewind) → stopping criteria → stream what became final → forward. It
returns the output, whose events and stats are the run's outcome (the mixin keeps them as
``model.last_backstep``); the loop keeps nothing on the model.

Why and where a row rewinds is the policy's call (:class:`~perpetual_logits.backstep.policy.RewindPolicy`, shared
with the vLLM driver); a rewind is one call here, :meth:`BackstepLoop.rewind`: measure (is the position still in
the logits buffer? the EOS probability), tell every unit where the row now ends (the policy takes the plan
itself), count.

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
from ..processor_list import StepProcessors, insert_before_warpers, per_row_lengths
from ..protocol import RowState
from .buffer import LogitsRing
from .cache import sliding_window
from .config import BackstepConfig
from .events import BackstepOutput, BackstepStats, RewindEvent
from .landing import LandingBias
from .policy import RewindPlan, RewindPolicy
from .prefill import prefill
from .records import StepRecords
from .rows import Rows
from .streaming import HoldBack
from .temperature import TemperatureSchedule
from .window import model_window

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
        prompt_mask: torch.Tensor | None = model_kwargs.get("attention_mask")

        # -- why and where rows rewind, what is forbidden, what is final: the backend-neutral policy
        self.policy = RewindPolicy(config, self.eos, vocab, tokenizer, greedy=not self.do_sample)

        # -- units: rows, logits buffer, temperature, streaming, records
        self.rows = Rows(input_ids, prompt_mask, max_length, self.pad)
        # A run holds at most max_new_tokens + 1 positions to draw from: a larger buffer (n_remove can be huge)
        # would only allocate memory no rewind can use.
        usable = max_length - self.rows.prompt_length + 1
        self.ring = LogitsRing(min(int(config.logits_buffer), usable), vocab, self.device)  # type: ignore[arg-type]
        self.temperature = (
            TemperatureSchedule(
                config.schedule, config.early_trigger, self.device, lambda: self.policy.schedule_from, config.widen
            )
            if config.schedule
            else None
        )
        self.holdback = HoldBack(streamer)
        self.records = StepRecords(
            bool(gc.return_dict_in_generate and gc.output_scores), bool(gc.return_dict_in_generate and gc.output_logits)
        )
        _check_window(model, config, self.rows.text_start, max_length, prompt_mask)

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
        self.processors = StepProcessors(processors)
        # Length and EOS are handled per row here; every other criterion sees the rows left-padded.
        self.criteria = StoppingCriteriaList(
            [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        )

        # -- the prompt forward, and what it leaves: the first logits, the cache layout, the decode step, the
        # context shift (last: every check above runs before the model does)
        capacity = max_length if window is None else min(max_length, window - 1)
        prompt = prefill(model, input_ids, gc, model_kwargs, capacity, self.rows.text_start, config.window)
        self.first_logits = prompt.logits
        self.cache = prompt.cache
        self.decode = prompt.decode
        self.window = prompt.window

        # -- every unit that follows rewinds (RowState), in one list; the policy is told apart (it takes plans)
        self.units: list[RowState] = [self.rows, self.ring, self.records, self.cache]
        self.units += [unit for unit in (self.temperature, self.window) if unit is not None]
        self.units += [p for p in self.processors if isinstance(p, RowState)]

        # -- outcome
        self.stats = BackstepStats(prefill_forwards=1)

    @property
    def events(self) -> list[list[RewindEvent]]:
        """Each row's rewinds so far (kept by the policy)."""
        return self.policy.events

    # -- the recipe ------------------------------------------------------------------------------------------
    def run(self) -> BackstepOutput | torch.Tensor:
        rows, bans, records = self.rows, self.policy.bans, self.records
        self._start()
        current = self.first_logits
        self.ring.store(current, list(range(rows.batch)), rows.lens)
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
    def _start(self) -> None:
        batch, prompt = self.rows.batch, self.rows.prompt_length
        for unit in [*self.units, self.policy]:
            unit.start(batch, prompt)
        self.policy.set_limits([self.rows.max_length] * batch)
        # The user's processors were reset once, by PerpetualGenerationMixin.generate; RowState ones start above.

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
        """Cut a row back as the policy planned: measure, tell every unit, count. ``raw``: this step's raw logits.

        Each unit does its own part: the cache keeps the kept tokens' slots (a row whose buffer lacks the
        position feeds its last kept token again in the next forward, see :meth:`_forward`), the temperature
        schedule restarts where the policy recorded it; the policy takes the plan itself (its rules, bans,
        schedule restart and the event).
        """
        row, position = plan.row, plan.position
        # -- measure: a deep rewind (the buffer no longer holds the logits there), and the distribution the
        # refused token was drawn from, before temperature, processors and bans
        deep = not self.ring.has(row, position)
        eos_prob = float(eos_probability(raw[row : row + 1], self.eos_tensor)[0]) if self.eos else 0.0
        # -- tell every unit
        self.policy.apply(plan, step, eos_prob, deep)
        for unit in self.units:
            unit.rewind(row, position)
        # -- count
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
        for unit in self.units:
            unit.rewind(row, cut)
        for token in extra:
            rows.append(row, token)
            self.records.add_token(row, replaced)

    def _finish(self, row: int) -> None:
        for unit in [*self.units, self.policy]:
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
        active = rows.active()
        if not active:
            return current
        # Rows that rewound hold every kept token in the cache already; those whose buffer holds the position
        # need no forward.
        waiting = [b for b in active if cache.fed(b) == rows.lens[b]]
        if len(waiting) == len(active) and all(ring.has(b, rows.lens[b]) for b in waiting):
            out = current.clone()
            for b in waiting:
                out[b] = ring.get(b, rows.lens[b])
            return out
        # A waiting row feeds its last kept token again: it must when its buffer lacks the position (a deep
        # rewind), and the others do because the forward runs anyway. Only a prompt given as inputs_embeds has
        # no token to feed before the first generated position: such a row (never deep, the policy's floor sees
        # to it) takes a masked padding slot and its buffer.
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
        raw = self.decode(tokens, mask, positions)
        self.stats.decode_forwards += 1
        fed = [b for b in active if real[b]]
        ring.store(raw, fed, rows.lens)
        for b in stale:
            raw[b] = ring.get(b, rows.lens[b])
            cache.drop_padding(b)
        return raw

    def _output(self) -> BackstepOutput | torch.Tensor:
        rows, records, cache = self.rows, self.records, self.cache
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
