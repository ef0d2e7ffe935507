"""The backstep decoding loop: transformers' ``_sample`` recipe with a rewind step.

Each step: current logits (fresh from the forward, or stored for rows that just rewound) → early triggers and
per-row temperature → bans → processors → select → per row: append, ask the rules, rewind or finish → stopping
criteria → stream what became final → forward. A rewind is one call: :meth:`BackstepLoop.rewind` tells every
unit (:class:`~perpetual_logits.backstep.protocol.RowState`) where the row now ends.

Forward passes, exactly: at batch size 1, decode forwards = final new tokens + removed tokens + deep rewinds - 1.
Every kept or removed token is fed once, except the run's last token (stock ``generate()`` never feeds it
either) and a token refused by a rule (a sampled EOS, the token completing a phrase): it is removed before it
is fed. A rewound row draws its next token from the logits buffer, so the rewind itself costs no forward. In a
batch the rows share forwards: a rewound row whose buffer would serve it feeds its last kept token again in the
forward the other rows need anyway, which keeps the cache free of holes.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, cast

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation import EosTokenCriteria, MaxLengthCriteria

from .. import _compat
from ..boundaries import cut_point
from ..distributions import eos_probability
from ..phrases import PhraseMatcher, default_end_phrases
from ..protocol import Rewind, RewindRule, RowState
from ..repetition import newline_token_ids
from .bans import Bans
from .buffer import LogitsRing
from .cache import CacheLayout, check_cache, sliding_window
from .config import BackstepConfig
from .events import BackstepEvent, BackstepOutput, BackstepStats
from .landing import Landing, LandingBias, RowText
from .lengths import per_row_lengths
from .records import StepRecords
from .rows import Rows
from .rules import EOSRule, LoopRule, PhraseRule
from .streaming import HoldBack
from .temperature import TemperatureSchedule, insert_before_warpers

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

        # -- units: rows, bans, logits buffer, temperature, hold-back, records (the cache comes with the prefill)
        self.rows = Rows(input_ids, self.prompt_mask, max_length, self.pad)
        self.bans = Bans(self.device)
        self.ring = LogitsRing(int(config.logits_buffer), vocab, self.device)  # type: ignore[arg-type]
        self.temperature = (
            TemperatureSchedule(config.schedule, config.early_trigger, self.device, config.widen)
            if config.schedule
            else None
        )
        self.holdback = HoldBack(streamer, int(config.hold_back))  # type: ignore[arg-type]
        self.records = StepRecords(
            bool(gc.return_dict_in_generate and gc.output_scores), bool(gc.return_dict_in_generate and gc.output_logits)
        )
        self.cache: CacheLayout | None = None

        # -- processors and criteria, as generate() built them, adapted to rows of different lengths
        processors = per_row_lengths(LogitsProcessorList(list(logits_processor)), lambda: self.rows.lens)
        if self.temperature is not None:
            processors = insert_before_warpers(processors, self.temperature.processor)
            if self.do_sample:  # greedy decoding has no truncation to widen: the argmax is unaffected
                processors = self.temperature.widen_truncation(processors, vocab)
        # -- the length mode and the landing: what the text says per row, EOS raised at sentence ends
        self.tokenizer = tokenizer
        landing = config.landing if isinstance(config.landing, Landing) else None
        self.text: RowText | None = None
        if landing is not None or config.length_mode:
            if tokenizer is None and (landing is not None or config.min_words):
                raise ValueError(
                    "the landing and `min_words` read the text: call generate(..., tokenizer=tokenizer) or "
                    "make_perpetual(model, tokenizer=tokenizer)"
                )
            self.text = RowText(
                tokenizer, lambda row: self.rows.ids[row], config.min_tokens, config.min_words, landing, max_length
            )
            if landing is not None:
                bias = LandingBias(self.text, lambda: self.rows.lens, self.eos)
                processors = LogitsProcessorList([bias, *processors])
        self.processors = processors
        # Length and EOS are handled per row here; every other criterion sees the rows left-padded.
        self.criteria = StoppingCriteriaList(
            [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        )

        # -- rules: why a row rewinds
        ban = config.ban_rewound_token
        self.rules: list[RewindRule] = [
            EOSRule(
                self.eos,
                config.n_remove,
                config.max_backsteps,
                config.on_exhausted == "suppress",
                (not self.do_sample) if ban is None else ban,
                self.bans,
            )
        ]
        self.rules += _phrase_rules(config, tokenizer, self.eos)
        if config.loops is not None:
            lines = config.loops.line_repeats > 0 and tokenizer is not None
            self.rules.append(LoopRule(config.loops, _newline_ids(tokenizer) if lines else None))
        self.rules += [_fresh_copy(rule) for rule in config.rules]

        # -- outcome
        self.events: list[list[BackstepEvent]] = []
        self.stats = BackstepStats()

    # -- the recipe ------------------------------------------------------------------------------------------
    def run(self) -> BackstepOutput | torch.Tensor:
        rows, bans, records = self.rows, self.bans, self.records
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
                appended = [b for b in active if self._take(b, chosen[b], step, scores)]
                self._check_stops(appended, scores)
                rows.flush()
                self.holdback.advance(rows.tokens, rows.lens, rows.finished, self._held())
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
        capacity = min([self.capacity + prefix, *static])
        self.cache = CacheLayout(cache, self.prompt_mask, self.input_ids.shape[1], capacity, self.device)
        self.stats.prefill_forwards = 1
        return outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.device)

    def _start(self) -> None:
        batch, prompt = self.rows.batch, self.rows.prompt_length
        self.events = [[] for _ in range(batch)]
        for unit in self._units():
            unit.start(batch, prompt)
        # Processors generate() reuses across calls: a stateful one starts afresh; one that keeps no per-row
        # state but can be reset is reset.
        for proc in self.processors:
            if not isinstance(proc, RowState) and callable(getattr(proc, "reset", None)):
                proc.reset()

    def _units(self) -> list[RowState]:
        units: list[RowState] = [self.rows, self.bans, self.ring, self.holdback, self.records]
        if self.cache is not None:
            units.append(self.cache)
        if self.temperature is not None:
            units.append(self.temperature)
        units += self.rules
        if self.text is not None:
            units.append(self.text)
        units += [p for p in self.processors if isinstance(p, RowState)]
        return units

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(-1)

    def _take(self, row: int, token: int, step: int, scores: torch.Tensor) -> bool:
        """Append the chosen token; let the rules keep it or rewind. Returns whether the token was kept."""
        rows = self.rows
        rows.append(row, token)
        self.records.add_token(row, step)
        text = self.text
        if text is not None:
            reached = text.minimum_reached(row)
            text.observe(row)
            if not reached and text.minimum_reached(row):
                self.bans.always[row].difference_update(self.eos)  # an exhausted EOS budget no longer holds
            if token in self.eos and text.accepts_end(row, rows.lens[row]):
                self._finish(row)  # the length mode's minimum is reached, or the row lands at a sentence end
                return True
        view = rows.view_of(row)
        for rule in self.rules:
            request = rule.check(view)
            if request is not None:
                if request.reason == "ending" and self.config.accept_end_phrases and text and text.minimum_reached(row):
                    break  # the length mode keeps the model's own ending once the minimum is reached
                self.rewind(row, request, step, scores)
                return False
        if token in self.eos:
            self._finish(row)
        elif rows.full(row):
            self._land(row)
            self._finish(row)
        return True

    def _land(self, row: int) -> None:
        """A row at ``max_new_tokens``: drop an unfinished held-back phrase from its end (in every mode) and, with
        the landing, cut it back to its last complete sentence -- never below what is final (streamed)."""
        rows = self.rows
        length = rows.lens[row]
        partial = max((getattr(rule, "partial", lambda _: 0)(row) for rule in self.rules), default=0)
        floor = max(self.holdback.final[row], rows.prompt_length)
        cut = max(length - partial, floor)
        text = self.text
        if text is not None and text.landing is not None and text.landing.cut_back:
            cut = cut_point(self.tokenizer, rows.ids[row][:cut], floor, rows.prompt_length)
        if cut < length:
            self.stats.landing_cuts += 1
            self.stats.removed_tokens += length - cut
            for unit in self._units():
                unit.rewind(row, cut)

    def rewind(self, row: int, request: Rewind, step: int, scores: torch.Tensor) -> None:
        """Cut ``row`` back as ``request`` asks (never into the prompt or into final tokens), and tell every unit."""
        rows = self.rows
        assert self.cache is not None
        length = rows.lens[row]
        position = min(max(request.position, self.holdback.final[row], rows.prompt_length), length - 1)
        if position == 0 and not self.ring.has(row, 0):
            position = 1  # an inputs_embeds prompt has no token to feed again for the first position
        old_ids = rows.ids[row]
        refused_eos = old_ids[-1] in self.eos  # a sampled EOS is only refused: it never was part of the text
        here = set(request.ban_here)
        banned = old_ids[position] if request.ban_first_removed and old_ids[position] not in here else None
        if banned is not None:
            here.add(banned)
        deep = not self.ring.has(row, position)
        for unit in self._units():
            unit.rewind(row, position)
        if deep:
            self.cache.drop_last(row)  # the token before `position` is fed again to get its logits
        self.bans.add(row, position, here)
        for pos, tokens in request.bans.items():
            if pos >= position:
                self.bans.add(row, pos, tokens)
        if request.restart_schedule and self.temperature is not None:
            self.temperature.restart(row, position)
        if request.reason == "eos":
            eos_prob = float(eos_probability(scores[row : row + 1], self.eos_tensor)[0])
        elif deep:
            eos_prob = 0.0
        else:
            eos_prob = float(eos_probability(self.ring.get(row, position)[None], self.eos_tensor)[0])
        removed = length - position - int(refused_eos)
        self.stats.removed_tokens += removed
        self.stats.deep_rewinds += int(deep)
        self.stats.backsteps += 1
        prompt = rows.prompt_length
        event = BackstepEvent(step, position - prompt, removed, eos_prob, deep, banned, request.reason, request.detail)
        self.events[row].append(event)

    def _finish(self, row: int) -> None:
        for unit in self._units():
            unit.finish(row)

    def _check_stops(self, rows: list[int], scores: torch.Tensor) -> None:
        if not rows or not len(self.criteria):
            return
        done = self.criteria(cast(torch.LongTensor, self.rows.right_aligned()), scores).tolist()
        for b in rows:
            if done[b] and not self.rows.finished[b]:
                self._finish(b)

    def _held(self) -> list[int]:
        held = [max((rule.held(b) for rule in self.rules), default=0) for b in range(self.rows.batch)]
        if self.text is not None:
            held = [max(h, self.text.held(b, self.rows.lens[b])) for b, h in enumerate(held)]
        return held

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
        return raw

    def _output(self) -> BackstepOutput | torch.Tensor:
        rows, records, cache = self.rows, self.records, self.cache
        assert cache is not None
        cache.realign(tight=True)  # the returned cache: no padding columns shared by every row
        self.stats.cache_slots = cache.width
        self.stats.peak_cache_slots = cache.peak_width
        self.stats.realignments = cache.realignments
        sequences = rows.sequences()
        self.model._store_last_backstep(self.events, self.stats)
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
            backstep_events=self.events,
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
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("backstep generation streams batch size 1 only (like TextStreamer)")
    if not kwargs.get("use_cache", True):
        raise ValueError("backstep generation needs use_cache=True: the rewind works on the KV cache")


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _phrase_rules(config: BackstepConfig, tokenizer: Any, eos: list[int]) -> list[RewindRule]:
    wanted = [(config.end_phrases, "ending", "end_phrases"), (config.ban_phrases, "ban", "ban_phrases")]
    rules: list[RewindRule] = []
    for phrases, mode, name in wanted:
        if phrases is None:
            continue
        if tokenizer is None:
            raise ValueError(
                f"`{name}` needs the tokenizer to read the text: call generate(..., tokenizer=tokenizer) or "
                "make_perpetual(model, tokenizer=tokenizer)"
            )
        if phrases in ("default", "chat"):
            listed = default_end_phrases(tokenizer, eos, chat=phrases == "chat")
        else:
            listed = list(phrases)
        matcher = PhraseMatcher(listed, tokenizer)
        rules.append(PhraseRule(matcher, mode, config.n_remove, config.max_phrase_rewinds, eos))
    return rules


_NEWLINES: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _newline_ids(tokenizer: Any) -> frozenset[int]:
    """Line-ending token ids of a tokenizer, computed once per tokenizer (it decodes the whole vocabulary)."""
    try:
        return _NEWLINES[tokenizer]
    except (KeyError, TypeError):
        ids = newline_token_ids(tokenizer)
        with contextlib.suppress(TypeError):
            _NEWLINES[tokenizer] = ids
        return ids


def _fresh_copy(rule: RewindRule) -> RewindRule:
    """Each call works on its own copy of a user rule, so concurrent calls do not share state."""
    import copy

    return copy.deepcopy(rule)
