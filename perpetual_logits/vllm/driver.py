"""Methods 3 and 4 and ending control on vLLM: a driver over the engine's step loop.

vLLM cannot rewind a running request. The driver does the next best thing: every token the engine returns is
shown to the rewind policy (:class:`~perpetual_logits.backstep.policy.RewindPolicy`, the same one the HF loop
asks); when it asks for a rewind -- a sampled EOS, an ending or banned phrase, a loop, a user's ``RewindRule`` --
the engine request is aborted and the prompt plus the kept tokens is submitted again as token ids, with our
processor's settings for its first tokens (the policy's bans from the rewind point on, EOS masked once its
budget is spent, the ``schedule`` since its restart). Prefix caching serves the kept prefix from the KV cache in
whole blocks, so a rewind recomputes at most one block of prompt plus the regenerated tokens. Resubmission
happens inside the engine's step loop, at once, while the other requests keep decoding (continuous batching),
not in rounds of ``LLM.generate``.

The semantics are the HF backend's, because the rules are the same code: ``max_tokens`` counts final tokens;
every rule has its own per-row budget; ``on_exhausted`` decides what an EOS does once ``max_backsteps`` is
spent (``"suppress"``: masked; ``"stop"``: the request ends at it, kept -- also under ``ignore_eos=True``, where
every EOS the engine lets through is rewound like any other); a rewind never reaches into the prompt nor into
final tokens (older than ``hold_back``).
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backstep import BackstepConfig, RewindEvent
from ..backstep.policy import RewindPlan, RewindPolicy
from ..protocol import RowView
from ..truncation import Truncation
from .processor import PerpetualLogitsProcessor, check_truncation_off, processor_for_vocabulary
from .settings import EXTRA_ARGS_KEY, EarlySettings, LandingSettings, RequestSettings, WideningSettings, schedule_table

__all__ = ["LLM", "PerpetualRequestOutput", "RequestStats", "eos_token_ids", "generate"]

Prompt = str | Sequence[int]
OnFinal = Callable[[int, list[int]], None]

_ids = itertools.count()


def LLM(model: str, **kwargs: Any) -> Any:
    """A ``vllm.LLM`` with :class:`PerpetualLogitsProcessor` registered (after any you pass).

    The one-line equivalent on your own engine: ``vllm.LLM(model, logits_processors=[PerpetualLogitsProcessor])``.

    Args:
        model (`str`): the model folder or id, as for ``vllm.LLM``.
        **kwargs: passed to ``vllm.LLM`` (on CPU pass ``kv_cache_memory_bytes``; see the README).
    """
    import vllm

    ours = _processor_class(model, bool(kwargs.get("trust_remote_code", False)))
    processors = [p for p in kwargs.pop("logits_processors", None) or [] if p is not PerpetualLogitsProcessor]
    if ours not in processors:
        processors.append(ours)
    return vllm.LLM(model, logits_processors=processors, **kwargs)


def _processor_class(model: str, trust_remote_code: bool) -> Any:
    """The processor whose admission check knows the model's vocabulary (the plain class if it cannot be read)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        return processor_for_vocabulary(int(config.get_text_config().vocab_size))
    except Exception:  # an unreadable config: the worker still ignores ids outside the logits
        return PerpetualLogitsProcessor


def eos_token_ids(llm: Any) -> tuple[int, ...]:
    """The ids that end generation for ``llm``: the tokenizer's EOS and the generation config's EOS ids."""
    ids: set[int] = set()
    tokenizer = llm.get_tokenizer()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        config = llm.llm_engine.model_config.try_get_generation_config() or {}
    except Exception:  # an engine without a generation config: the tokenizer's EOS is enough
        config = {}
    eos = config.get("eos_token_id")
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    if not ids:
        raise ValueError("the model defines no EOS token id")
    return tuple(sorted(ids))


@dataclass
class RequestStats:
    """Work counters of one request (the benchmark reads them).

    Attributes:
        submissions: engine requests made (1 + rewinds that were resubmitted).
        sampled_tokens: tokens the engine sampled for it, removed ones and EOS included.
        resubmitted_prompt_tokens: prompt tokens of the resubmissions (prompt + kept tokens).
        cached_prompt_tokens: of those, tokens the engine served from its prefix cache.
    """

    submissions: int = 0
    sampled_tokens: int = 0
    resubmitted_prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass
class PerpetualRequestOutput:
    """The result for one prompt.

    Attributes:
        prompt_token_ids: the prompt.
        token_ids: the generated tokens (EOS only when the request ended at one, as with ``on_exhausted="stop"``).
        text: ``token_ids`` decoded (special tokens skipped unless ``skip_special_tokens=False``), without the stop
            string the request stopped at (unless ``include_stop_str_in_output``), as vLLM's own text.
        finish_reason: ``"length"`` (``max_tokens`` final tokens), ``"stop"`` (EOS, or a stop string / id of
            the request's ``SamplingParams``), as vLLM reports it.
        backstep_events: the rewinds, in order (see :class:`~perpetual_logits.RewindEvent`; ``step`` is the
            number of tokens the request had sampled before the token that triggered the rewind, removed ones
            included; ``eos_prob`` is the sampled EOS id's raw probability for an EOS rewind -- the same as the
            HF backend's when the model has one EOS id -- and NaN for other reasons: vLLM returns no other
            probabilities).
        stats: work counters.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    backstep_events: list[RewindEvent]
    stats: RequestStats


@dataclass
class Row:
    """One prompt's progress across its engine requests (why and where it rewinds is the policy's call)."""

    index: int
    prompt: list[int]
    params: Any
    ids: list[int] = field(default_factory=list)  # prompt + generated tokens kept so far
    committed: int = 0  # generated tokens that are final (streamed, never removed)
    stats: RequestStats = field(default_factory=RequestStats)
    request_id: str | None = None
    start: int = 0  # generated tokens kept when the current engine request was submitted
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    done: bool = False
    landing: tuple[int, int, float] | None = None  # the landing bonus the current engine request applies

    def __post_init__(self) -> None:
        self.ids = list(self.prompt)

    @property
    def kept(self) -> list[int]:
        """The generated tokens kept so far."""
        return self.ids[len(self.prompt) :]

    @property
    def generated(self) -> int:
        return len(self.ids) - len(self.prompt)


class Driver:
    """Runs the prompts through ``llm``'s engine, resubmitting rewound requests from inside the step loop.

    The rewind policy (:class:`~perpetual_logits.backstep.policy.RewindPolicy`, the HF loop's too) sees every
    token the engine returns and answers keep, finish or rewind; the driver only moves requests in and out of
    the engine and tells the processor the policy's bans and schedule.

    :meth:`run` drives the engine's own step loop. A caller with a loop of its own (the server's asynchronous
    engine) drives a row with :meth:`submit` once and :meth:`on_output` for each of its request's outputs.
    """

    def __init__(
        self,
        llm: Any,
        rows: list[Row],
        config: BackstepConfig | None,
        tokenizer: Any,
        on_final: OnFinal | None,
    ) -> None:
        from vllm.sampling_params import RequestOutputKind

        self.engine = llm.llm_engine
        self.tokenizer = tokenizer
        self.rows = rows
        self.config = config
        self.on_final = on_final
        self.delta = RequestOutputKind.DELTA
        self.eos = set(eos_token_ids(llm))
        self.by_id: dict[str, Row] = {}
        self.policy: RewindPolicy | None = None
        self.key = uuid.uuid4().hex  # early triggers keep each row's history in the processor under this key
        if config is not None:
            self.policy = RewindPolicy(config, sorted(self.eos), _vocab_size(llm, tokenizer), tokenizer)
            greedy = [(row.params.temperature or 0.0) < 1e-5 for row in rows]
            self.policy.start_rows([len(row.prompt) for row in rows], greedy)
            # The length mode and the landing (minimum, EOS accepted at sentence ends near the limit, the cut back
            # to the last sentence) come with the policy; the landing's EOS bonus is applied by our processor
            # (judged on the previous token, see LandingSettings).
            self.policy.set_limits([len(row.prompt) + int(row.params.max_tokens) for row in rows])

    # -- submission -------------------------------------------------------------------------------------
    def submit(self, row: Row) -> None:
        """Send ``row`` to the engine as a new request: its prompt and kept tokens, with our processor's settings
        from its current length on."""
        params = row.params.clone()
        params.output_kind = self.delta
        params.max_tokens = row.params.max_tokens - row.generated
        if row.params.min_tokens:
            params.min_tokens = max(0, row.params.min_tokens - row.generated)
        if self.config is not None:
            if params.logprobs is None:
                params.logprobs = 0  # the sampled token's raw log-probability: the EOS probability of an event
            if row.stats.submissions and row.params.seed is not None:
                # A resubmission with the same seed would replay the same draws (and the same EOS).
                params.seed = (row.params.seed * 1_000_003 + row.stats.submissions) % (1 << 63)
            ours = self._settings(row)
            if ours:
                params.extra_args = {**(row.params.extra_args or {}), EXTRA_ARGS_KEY: ours}
            if "widen" in ours:  # the processor truncates (see WideningSettings); vLLM's truncation would narrow it
                params.top_k, params.top_p, params.min_p = 0, 1.0, 0.0
        row.request_id = f"pl-{next(_ids)}-{row.index}"
        row.start = row.generated
        self.by_id[row.request_id] = row
        prompt = {"prompt_token_ids": list(row.ids)}
        # Outputs and aborts use this (external) id; vLLM adds a random suffix only internally.
        self.engine.add_request(row.request_id, prompt, params)
        if row.stats.submissions:
            row.stats.resubmitted_prompt_tokens += len(row.ids)
        row.stats.submissions += 1

    def _settings(self, row: Row) -> dict[str, Any]:
        """Our processor's settings for the engine request that starts at the row's current length: the
        policy's bans from there on, EOS masked once its budget is spent, the schedule since its restart."""
        assert self.config is not None and self.policy is not None
        cfg, policy = self.config, self.policy
        start = len(row.ids)  # positions count the prompt; the processor counts the request's output
        ours: dict[str, Any] = {"eos": sorted(self.eos)}
        bans = [[pos - start, sorted(tokens)] for pos, tokens in policy.bans.at[row.index].items() if pos >= start]
        if bans:
            ours["bans"] = bans
        if policy.eos_suppressed(row.index):
            ours["suppress_eos"] = True
        schedule = getattr(cfg, "schedule", None)
        restarted = policy.schedule_from[row.index]
        early, widen = getattr(cfg, "early_trigger", None), getattr(cfg, "widen", None)
        greedy = (row.params.temperature or 0.0) < 1e-5
        if schedule is not None and (restarted is not None or early is not None):
            # The whole table and where it started (relative to this request; None: not yet): the processor
            # restarts it where the early trigger fires.
            started = None if restarted is None else restarted - start
            ours["schedule"] = {**schedule_table(schedule).to_data(), "started": started}
            if early is not None:
                ours["early"] = EarlySettings.of(early, f"{self.key}-{row.index}", row.generated).to_data()
            if widen is not None and not greedy:
                ours["widen"] = WideningSettings.of(widen, schedule, _configured(row.params)).to_data()
        row.landing = policy.landing_bonus(row.index)
        if row.landing is not None:
            due, margin, strength = row.landing
            ends = sorted(policy.sentence_end_ids())
            ours["landing"] = LandingSettings(due - start, margin, strength, tuple(ends), row.ids[-1]).to_data()
        return ours if set(ours) != {"eos"} else {}

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> None:
        for each in self.rows:
            self.submit(each)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                row = self.by_id.get(output.request_id)
                if row is None or output.request_id != row.request_id:
                    continue  # an engine request abandoned after a rewind (aborted; a last output may follow)
                self.on_output(row, output)
                if output.finished or row.request_id != output.request_id:
                    del self.by_id[output.request_id]

    def on_output(self, row: Row, output: Any) -> None:
        """Show the policy the tokens of one engine output of ``row``'s current request; on a rewind the request is
        aborted and the row submitted again (its ``request_id`` changes), on its end the row is finished."""
        completion = output.outputs[0]
        if row.stats.submissions > 1 and row.generated == row.start and output.num_cached_tokens is not None:
            # The first output of a resubmission tells how much of its prompt came from the prefix cache.
            row.stats.cached_prompt_tokens += int(output.num_cached_tokens)
        new = list(completion.token_ids)
        sampled_before = row.stats.sampled_tokens
        row.stats.sampled_tokens += len(new)
        finished = bool(output.finished)
        policy = self.policy
        if policy is None:  # plain generation: the engine decides everything
            row.ids.extend(new)
        else:
            prompt_length, max_tokens = len(row.prompt), row.params.max_tokens
            for i, token in enumerate(new):
                row.ids.append(token)
                view = RowView(row.index, row.ids, prompt_length, 0, final=row.generated >= max_tokens)
                decision = policy.after_token(view)
                if decision == "keep":
                    if row.landing != policy.landing_bonus(row.index) and not finished:
                        # The length mode's minimum was reached: the landing starts here. The engine request
                        # carries its processor settings, so it is submitted again from this token.
                        self.engine.abort_request([row.request_id])
                        self.submit(row)
                        return
                    continue
                if not (finished and i == len(new) - 1):
                    self.engine.abort_request([row.request_id])  # later tokens of this request are dropped
                if decision == "finish":  # a kept EOS (budget spent, on_exhausted="stop") or max_tokens reached
                    if token not in self.eos:
                        self._cut_at_limit(row, view)
                    self._finish(row, "stop" if token in self.eos else "length")
                else:
                    assert isinstance(decision, RewindPlan)
                    eos_prob = _sampled_probability(completion, i, token) if decision.reason == "eos" else math.nan
                    policy.apply(decision, sampled_before + i, eos_prob)
                    del row.ids[decision.position :]
                    self.submit(row)
                return
        if finished:
            row.stop_reason = getattr(completion, "stop_reason", None)
            self._finish(row, completion.finish_reason)
        else:
            self._commit(row)

    def _cut_at_limit(self, row: Row, view: RowView) -> None:
        """A request at ``max_tokens`` ends where the policy says: no unfinished held-back phrase and, with the
        landing, at its last complete sentence (as on the HF backend)."""
        assert self.policy is not None
        cut, extra = self.policy.cut_at_limit(view)
        if cut < len(row.ids):
            self.policy.rewind(row.index, cut)
            del row.ids[cut:]
            row.ids.extend(extra)

    def _finish(self, row: Row, reason: str | None) -> None:
        row.done = True
        row.finish_reason = reason
        row.request_id = None
        if self.policy is not None:
            self.policy.finish(row.index)
        self._commit(row, final=True)

    def _commit(self, row: Row, final: bool = False) -> None:
        """Make tokens final as the policy says (everything at the end); stream them."""
        if self.policy is None:
            begin, end = row.committed, row.generated
        else:
            begin, end = (p - len(row.prompt) for p in self.policy.settle(row.index, len(row.ids), final))
        if end > begin:
            if self.on_final is not None:
                self.on_final(row.index, row.kept[begin:end])
            row.committed = end

    def events(self, row: Row) -> list[RewindEvent]:
        return self.policy.events[row.index] if self.policy is not None else []

    def text(self, row: Row) -> str:
        """The kept tokens decoded, without the stop string the request stopped at (as vLLM's own text)."""
        text = self.tokenizer.decode(row.kept, skip_special_tokens=row.params.skip_special_tokens)
        stop = row.stop_reason
        keeps_stop = row.params.include_stop_str_in_output
        if row.finish_reason == "stop" and isinstance(stop, str) and stop and not keeps_stop:
            at = text.rfind(stop)  # the engine stopped at its first occurrence in the newest text: the last one
            if at >= 0:
                text = text[:at]
        return text


def _vocab_size(llm: Any, tokenizer: Any) -> int:
    """The model's vocabulary size (logits width); the tokenizer's length when the engine does not say."""
    try:
        return int(llm.llm_engine.model_config.get_vocab_size())
    except Exception:  # an engine without a model config: the tokenizer's size is the next best
        return len(tokenizer)


def _sampled_probability(completion: Any, index: int, token: int) -> float:
    """exp(logprob) of the sampled ``token`` at ``index`` of this output (vLLM's raw log-probabilities), or NaN."""
    try:
        entry = completion.logprobs[index]
        return float(math.exp(entry[token].logprob))
    except (TypeError, IndexError, KeyError, AttributeError):
        return float("nan")


def _configured(params: Any) -> Truncation:
    """The top-k / top-p / min-p and temperature a request samples with, as a :class:`Truncation`."""
    top_k = params.top_k if params.top_k and params.top_k > 0 else 0
    return Truncation(top_k, float(params.top_p), float(params.min_p or 0.0), float(params.temperature))


def _with_truncation_off(params: Any) -> Any:
    """A copy of ``params`` as the driver submits it with ``widen`` (vLLM's top-k / top-p / min-p off)."""
    copy = params.clone()
    copy.top_k, copy.top_p, copy.min_p = 0, 1.0, 0.0
    return copy


def _check_extra_args(params: Any) -> None:
    """With ``backstep=``, the driver writes our ``extra_args`` key itself (the EOS ids it rewinds on, the bans,
    the schedule); a request that sets it would make the processor mask other ids than the driver rewinds on."""
    extra = params.extra_args
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise ValueError(f"`params.extra_args` must be a dict, got {type(extra).__name__}")
    if EXTRA_ARGS_KEY in extra:
        raise ValueError(
            f"`params.extra_args[{EXTRA_ARGS_KEY!r}]` must not be set with backstep= (got {extra[EXTRA_ARGS_KEY]!r}): "
            "the driver sets it from the BackstepConfig -- EOS is rewound on the model's EOS ids and masked once "
            "max_backsteps is spent (on_exhausted='suppress'); for Methods 1 and 2 call llm.generate without backstep="
        )


def _tokenize(tokenizer: Any, prompt: object, index: int) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    raise ValueError(f"`prompts[{index}]` must be a string or a non-empty list of token ids, got {prompt!r}")


def _check_model_length(llm: Any, rows: list[Row]) -> None:
    """Refuse a request that cannot fit the engine's context: the driver has no context shift (a rewind resubmits
    prompt + kept tokens as one prompt, which vLLM refuses past ``max_model_len``, and vLLM itself would end the
    request there with finish reason "length", short of ``max_tokens``)."""
    limit = getattr(getattr(llm.llm_engine, "model_config", None), "max_model_len", None)
    if not isinstance(limit, int):
        return
    for row in rows:
        total = len(row.prompt) + int(row.params.max_tokens)
        if total > limit:
            raise ValueError(
                f"prompt {row.index}: prompt ({len(row.prompt)} tokens) + max_tokens ({row.params.max_tokens}) = "
                f"{total} exceeds the engine's max_model_len ({limit}); the vLLM driver has no context shift: lower "
                "max_tokens, or use the HF backend with BackstepConfig(window=ContextShift())"
            )


def generate(
    llm: Any,
    prompts: Prompt | Sequence[Prompt],
    params: Any = None,
    backstep: BackstepConfig | None = None,
    on_final: OnFinal | None = None,
) -> list[PerpetualRequestOutput]:
    """Generate with backstep (Methods 3 and 4, ending control) on a vLLM engine.

    Args:
        llm (`vllm.LLM`): an engine with :class:`PerpetualLogitsProcessor` registered (see :func:`LLM`).
        prompts (`str`, `list[int]`, or a list of them): the prompts, as text or token ids.
        params (`vllm.SamplingParams` or a list, one per prompt, *optional*): ``max_tokens`` must be set (it
            counts final tokens); ``n`` must be 1. Defaults to ``SamplingParams(max_tokens=16)``.
        backstep (`BackstepConfig`, *optional*): the rewind rules. ``None`` generates plainly (the output then
            equals ``llm.generate`` for the same seeds). Every field means what it means on the HF backend
            (``loops`` and ``rules`` included: each call works on ``rule.fresh()``); ``logits_buffer`` has no
            meaning here (vLLM keeps no logits to reuse; the prefix cache plays its part); ``early_trigger``
            and ``widen`` run in the processor (``widen`` with vLLM's penalties, or narrower than the request's
            own truncation, is refused). ``params.extra_args`` must then not set our key
            (:data:`~perpetual_logits.vllm.EXTRA_ARGS_KEY`): the driver sets it.
        on_final (`callable`, *optional*): streaming with hold-back: called as ``on_final(prompt_index,
            token_ids)`` with each request's tokens once they are final (never removed afterwards). The calls of
            one request add up to its returned ``token_ids``.

    Returns:
        `list[PerpetualRequestOutput]`: one per prompt, in order.
    """
    from vllm import SamplingParams

    if backstep is not None and not isinstance(backstep, BackstepConfig):
        raise ValueError(f"`backstep` must be None or a perpetual_logits BackstepConfig, got {backstep!r}")
    if on_final is not None and not callable(on_final):
        raise ValueError(f"`on_final` must be callable, got {on_final!r}")
    if not getattr(llm, "llm_engine", None):
        raise ValueError(f"`llm` must be a vllm.LLM, got {type(llm).__name__}")
    tokenizer = llm.get_tokenizer()
    single = isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(t, int) for t in prompts)
    )
    items: list[Any] = [prompts] if single else list(prompts)
    if not items:
        raise ValueError("`prompts` must not be empty")
    if params is None:
        params = SamplingParams(max_tokens=16)
    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(items)
    if len(per_prompt) != len(items):
        raise ValueError(f"`params` must be one SamplingParams or one per prompt ({len(items)}), got {len(per_prompt)}")
    for p in per_prompt:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"`params` must hold vllm.SamplingParams, got {type(p).__name__}")
        if p.n != 1:
            raise ValueError(f"`params.n` must be 1 (backstep follows one sequence per prompt), got {p.n}")
        if p.max_tokens is None or p.max_tokens < 1:
            raise ValueError(f"`params.max_tokens` must be set (it counts final tokens), got {p.max_tokens!r}")
        if backstep is not None:
            _check_extra_args(p)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    for p in per_prompt:  # refused here, before any request runs (the engine's workers must never see them)
        RequestSettings.parse(p.extra_args, vocab_size=vocab)
        # Greedy decoding sends no widening (it never changes the argmax); sampling: no penalties, not narrower.
        widen = backstep.widen if backstep is not None and p.temperature >= 1e-5 else None
        if widen is not None and backstep is not None and backstep.schedule is not None:
            check_truncation_off(_with_truncation_off(p))
            WideningSettings.of(widen, backstep.schedule, _configured(p))
    rows = [Row(i, _tokenize(tokenizer, prompt, i), p) for i, (prompt, p) in enumerate(zip(items, per_prompt))]
    if backstep is not None:
        _check_model_length(llm, rows)
    if (
        backstep is not None
        and tokenizer is None
        and any(getattr(backstep, name, None) is not None for name in ("end_phrases", "ban_phrases"))
    ):
        raise ValueError("`end_phrases` / `ban_phrases` need the engine's tokenizer")
    driver = Driver(llm, rows, backstep, tokenizer, on_final)
    try:
        driver.run()
    except BaseException:
        live = [r.request_id for r in rows if r.request_id is not None and not r.done]
        if live:
            llm.llm_engine.abort_request(live)
        raise
    return [
        PerpetualRequestOutput(
            prompt_token_ids=row.prompt,
            token_ids=row.kept,
            text=driver.text(row),
            finish_reason=row.finish_reason,
            backstep_events=driver.events(row),
            stats=row.stats,
        )
        for row in rows
    ]
