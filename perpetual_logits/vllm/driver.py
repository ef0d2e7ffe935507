"""Methods 3 and 4 and ending control on vLLM: a driver over the engine's step loop.

vLLM cannot rewind a running request. The driver does the next best thing: a request that samples EOS (or
whose text completes a banned phrase) is cut back by up to ``n_remove`` tokens and submitted again as token
ids -- the prompt plus the kept tokens -- with our processor's settings for its first tokens (EOS and, where
the config says so, the rewound token banned at the rewind point; the ``schedule`` from there on). Prefix
caching serves the kept prefix from the KV cache in whole blocks, so a rewind recomputes at most one block
of prompt plus the regenerated tokens. Resubmission happens inside the engine's step loop, at once, while
the other requests keep decoding (continuous batching), not in rounds of ``LLM.generate``.

Semantics shared with the HF backend: ``max_tokens`` counts final tokens; ``max_backsteps`` bounds EOS
rewinds per request, then ``on_exhausted`` (``"suppress"``: EOS is masked; ``"stop"``: the request ends at its
next EOS, which is kept); ``max_phrase_rewinds`` bounds phrase rewinds; a rewind never reaches into the prompt
nor into final tokens (older than ``hold_back``); the regenerated token at the rewind point is never EOS;
``ban_rewound_token`` (default: under greedy decoding only) and phrase rewinds forbid the token that began the
removed span.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..backstep import BackstepConfig, BackstepEvent
from ..phrases import PhraseMatcher, default_end_phrases
from .processor import PerpetualLogitsProcessor
from .settings import KEY, schedule_table

__all__ = ["LLM", "PerpetualRequestOutput", "RequestStats", "eos_token_ids", "generate"]

Prompt = str | Sequence[int]
OnFinal = Callable[[int, list[int]], None]

_ids = itertools.count()
_EVENT_FIELDS = {f.name for f in fields(BackstepEvent)}


def LLM(model: str, **kwargs: Any) -> Any:
    """A ``vllm.LLM`` with :class:`PerpetualLogitsProcessor` registered (after any you pass).

    The one-line equivalent on your own engine: ``vllm.LLM(model, logits_processors=[PerpetualLogitsProcessor])``.

    Args:
        model (`str`): the model folder or id, as for ``vllm.LLM``.
        **kwargs: passed to ``vllm.LLM`` (on CPU pass ``kv_cache_memory_bytes``; see the README).
    """
    import vllm

    processors = list(kwargs.pop("logits_processors", None) or [])
    if PerpetualLogitsProcessor not in processors:
        processors.append(PerpetualLogitsProcessor)
    return vllm.LLM(model, logits_processors=processors, **kwargs)


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
        text: ``token_ids`` decoded (special tokens skipped).
        finish_reason: ``"length"`` (``max_tokens`` final tokens), ``"stop"`` (EOS, or a stop string / id of
            the request's ``SamplingParams``), as vLLM reports it.
        backstep_events: the rewinds, in order (see :class:`~perpetual_logits.BackstepEvent`; ``step`` is the
            number of tokens the request had sampled before the EOS, removed ones included).
        stats: work counters.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    backstep_events: list[BackstepEvent]
    stats: RequestStats


@dataclass
class _Row:
    """One prompt's progress across its engine requests."""

    index: int
    prompt: list[int]
    params: Any
    kept: list[int] = field(default_factory=list)
    committed: int = 0  # generated tokens that are final (streamed, never removed)
    phrase_hold: int = 0
    used: int = 0
    phrase_rewinds: int = 0
    bans: dict[int, set[int]] = field(default_factory=dict)
    schedule_from: int | None = None
    events: list[BackstepEvent] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    request_id: str | None = None
    start: int = 0  # generated tokens kept when the current engine request was submitted
    finish_reason: str | None = None
    done: bool = False


class _Driver:
    """Runs the prompts through ``llm``'s engine, resubmitting rewound requests from inside the step loop."""

    def __init__(
        self,
        llm: Any,
        rows: list[_Row],
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
        self.by_id: dict[str, _Row] = {}
        # (mode, matcher): "ending" for BackstepConfig.end_phrases, "ban" for ban_phrases (fields read by name).
        self.matchers: list[tuple[str, PhraseMatcher]] = []
        if config is not None:
            hold_back = getattr(config, "hold_back", None)
            self.hold_back = int(hold_back) if hold_back is not None else 2 * config.n_remove
            for mode, name in (("ending", "end_phrases"), ("ban", "ban_phrases")):
                phrases = getattr(config, name, None)
                if phrases is None:
                    continue
                if phrases in ("default", "chat"):
                    chat = {"chat": True} if phrases == "chat" else {}
                    phrases = default_end_phrases(tokenizer, sorted(self.eos), **chat)
                self.matchers.append((mode, PhraseMatcher(list(phrases), tokenizer)))
            unsupported = [name for name in ("early_trigger", "loops", "widen", "rules") if getattr(config, name, None)]
            if unsupported:
                warnings.warn(
                    f"BackstepConfig fields {unsupported} are not supported on vLLM and are ignored (they need "
                    "per-step statistics or per-row warpers inside the engine)",
                    stacklevel=3,
                )

    # -- submission -------------------------------------------------------------------------------------
    def _submit(self, row: _Row) -> None:
        params = row.params.clone()
        params.output_kind = self.delta
        params.max_tokens = row.params.max_tokens - len(row.kept)
        if row.params.min_tokens:
            params.min_tokens = max(0, row.params.min_tokens - len(row.kept))
        if self.config is not None:
            if params.logprobs is None:
                params.logprobs = 0  # the sampled token's raw log-probability: the EOS probability of an event
            if row.stats.submissions and row.params.seed is not None:
                # A resubmission with the same seed would replay the same draws (and the same EOS).
                params.seed = (row.params.seed * 1_000_003 + row.stats.submissions) % (1 << 63)
            ours = self._settings(row)
            if ours:
                params.extra_args = {**(row.params.extra_args or {}), KEY: ours}
        row.request_id = f"pl-{next(_ids)}-{row.index}"
        row.start = len(row.kept)
        self.by_id[row.request_id] = row
        prompt = {"prompt_token_ids": row.prompt + row.kept}
        # Outputs and aborts use this (external) id; vLLM adds a random suffix only internally.
        self.engine.add_request(row.request_id, prompt, params)
        if row.stats.submissions:
            row.stats.resubmitted_prompt_tokens += len(row.prompt) + len(row.kept)
        row.stats.submissions += 1

    def _settings(self, row: _Row) -> dict[str, Any]:
        """Our processor's settings for the engine request that starts at generated position ``len(kept)``."""
        assert self.config is not None
        cfg = self.config
        start = len(row.kept)
        ours: dict[str, Any] = dict((row.params.extra_args or {}).get(KEY, {}))
        ours.setdefault("eos", sorted(self.eos))
        bans = [[pos - start, sorted(tokens)] for pos, tokens in row.bans.items() if pos >= start]
        if bans:
            ours["bans"] = bans
        if row.used >= cfg.max_backsteps and cfg.on_exhausted == "suppress":
            ours["suppress_eos"] = True
        schedule = getattr(cfg, "schedule", None)
        if schedule is not None and row.schedule_from is not None:
            table = schedule_table(schedule)
            offset = start - row.schedule_from
            if table.forever:
                ours["schedule"] = table.to_data()
            elif offset < len(table.factors):
                ours["schedule"] = {"factors": list(table.factors[offset:]), "forever": False}
        return ours if set(ours) != {"eos"} else {}

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> None:
        for each in self.rows:
            self._submit(each)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                row = self.by_id.get(output.request_id)
                if row is None or output.request_id != row.request_id:
                    continue  # an engine request abandoned after a rewind (aborted; a last output may follow)
                self._on_output(row, output)
                if output.finished or row.request_id != output.request_id:
                    del self.by_id[output.request_id]

    def _on_output(self, row: _Row, output: Any) -> None:
        completion = output.outputs[0]
        if row.stats.submissions > 1 and len(row.kept) == row.start and output.num_cached_tokens is not None:
            # The first output of a resubmission tells how much of its prompt came from the prefix cache.
            row.stats.cached_prompt_tokens += int(output.num_cached_tokens)
        new = list(completion.token_ids)
        row.stats.sampled_tokens += len(new)
        finished = bool(output.finished)
        for i, token in enumerate(new):
            last = finished and i == len(new) - 1
            # An EOS ends its engine request; as the max_tokens-th token it is still an EOS to rewind from.
            if token in self.eos and last and completion.finish_reason in ("stop", "length"):
                self._on_eos(row, token, completion)
                return
            row.kept.append(token)
            if self.matchers and self._scan(row, final=last and completion.finish_reason == "length"):
                return
        if finished:
            self._finish(row, completion.finish_reason)
        else:
            self._commit(row)

    def _on_eos(self, row: _Row, token: int, completion: Any) -> None:
        cfg = self.config
        if cfg is None or row.used >= cfg.max_backsteps:
            row.kept.append(token)  # on_exhausted="stop" (or no backstep): the request ends at this EOS, kept
            self._finish(row, "stop")
            return
        removed = min(cfg.n_remove, len(row.kept) - row.committed)
        eos_prob = _sampled_probability(completion, token)
        self._rewind(row, len(row.kept) - removed, eos_prob, "eos", None, step=row.stats.sampled_tokens - 1)

    def _scan(self, row: _Row, final: bool) -> bool:
        """Rewind ``row`` if its newest token completed an ending or a banned phrase; returns whether it did.

        An ending is rewound like an EOS: ``n_remove`` tokens before the phrase, its first token forbidden where
        it began. A banned phrase is cut back to where it began and that token is forbidden there.
        """
        assert self.config is not None
        ids = row.prompt + row.kept
        row.phrase_hold = 0
        found: tuple[str, Any] | None = None
        for mode, matcher in self.matchers:
            scan = matcher.scan(ids, len(row.prompt), 1, final=final)
            # An ending rewinds n_remove tokens before the phrase: hold those back while it may complete.
            extra = self.config.n_remove if mode == "ending" and scan.hold else 0
            row.phrase_hold = max(row.phrase_hold, scan.hold + extra)
            if found is None and scan.match is not None:
                found = (mode, scan.match)
        if found is None or row.phrase_rewinds >= self.config.max_phrase_rewinds:
            return False
        mode, match = found
        start = match.start - len(row.prompt)
        if mode == "ending":
            target = max(start - self.config.n_remove, row.committed)
            later_ban = (start, row.kept[start]) if start > target else None
        else:
            target, later_ban = max(start, row.committed), None
        if row.request_id is not None:
            # The engine request may have sampled further tokens already; they are dropped with it.
            self.engine.abort_request([row.request_id])
        reason = "ending" if mode == "ending" else "phrase"
        self._rewind(row, target, 0.0, reason, match.phrase, row.stats.sampled_tokens - 1, later_ban)
        return True

    def _rewind(
        self,
        row: _Row,
        p: int,
        eos_prob: float,
        reason: str,
        phrase: str | None,
        step: int,
        later_ban: tuple[int, int] | None = None,
    ) -> None:
        cfg = self.config
        assert cfg is not None
        removed = len(row.kept) - p
        first_removed = row.kept[p] if removed > 0 else None
        del row.kept[p:]
        greedy = (row.params.temperature or 0.0) < 1e-5
        ban_rewound = cfg.ban_rewound_token if cfg.ban_rewound_token is not None else greedy
        bans = {pos: toks for pos, toks in row.bans.items() if pos <= p}
        here = bans.setdefault(p, set())
        here.update(self.eos)  # the regenerated token must not end the request at once
        banned = None
        if later_ban is not None:  # an ending: its first token is forbidden where the phrase began
            bans.setdefault(later_ban[0], set()).add(later_ban[1])
            banned = later_ban[1]
        elif first_removed is not None and (reason == "phrase" or ban_rewound):
            banned = first_removed
            here.add(banned)
        row.bans = bans
        if getattr(cfg, "schedule", None) is not None:
            row.schedule_from = p
        if reason == "eos":
            row.used += 1
        else:
            row.phrase_rewinds += 1
        row.phrase_hold = 0
        # The phrase field is `detail` in newer BackstepEvents (`phrase` before): fill whichever exists.
        text_field = "detail" if "detail" in _EVENT_FIELDS else "phrase"
        event: Any = BackstepEvent(
            step=step,
            position=p,
            removed=removed,
            eos_prob=eos_prob,
            deep=False,
            banned_token=banned,
            reason=reason,
            **{text_field: phrase},
        )
        row.events.append(event)
        self._submit(row)

    def _finish(self, row: _Row, reason: str | None) -> None:
        row.done = True
        row.finish_reason = reason
        row.request_id = None
        self._commit(row, final=True)

    def _commit(self, row: _Row, final: bool = False) -> None:
        """Make tokens final once they are ``hold_back`` behind (everything at the end); stream them."""
        if final or self.config is None:
            target = len(row.kept)
        else:
            target = max(row.committed, len(row.kept) - max(self.hold_back, row.phrase_hold))
        if target > row.committed:
            if self.on_final is not None:
                self.on_final(row.index, row.kept[row.committed : target])
            row.committed = target


def _sampled_probability(completion: Any, token: int) -> float:
    """exp(logprob) of the sampled ``token`` at the last step (vLLM's raw log-probabilities), or NaN."""
    try:
        entry = completion.logprobs[-1]
        return float(math.exp(entry[token].logprob))
    except (TypeError, IndexError, KeyError, AttributeError):
        return float("nan")


def _tokenize(tokenizer: Any, prompt: object, index: int) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    raise ValueError(f"`prompts[{index}]` must be a string or a non-empty list of token ids, got {prompt!r}")


def _check_model_length(llm: Any, rows: list[_Row]) -> None:
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
            equals ``llm.generate`` for the same seeds). Read by field name: ``n_remove``, ``schedule``,
            ``max_backsteps``, ``on_exhausted``, ``ban_rewound_token``, ``hold_back``, ``end_phrases``,
            ``ban_phrases``, ``max_phrase_rewinds``. ``logits_buffer`` has no meaning here (vLLM keeps no logits
            to reuse; the prefix cache plays its part); ``early_trigger``, ``loops``, ``widen`` and ``rules``
            are not supported (a warning names them).
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
    rows = [_Row(i, _tokenize(tokenizer, prompt, i), p) for i, (prompt, p) in enumerate(zip(items, per_prompt))]
    if backstep is not None:
        _check_model_length(llm, rows)
    if (
        backstep is not None
        and tokenizer is None
        and any(getattr(backstep, name, None) is not None for name in ("end_phrases", "ban_phrases"))
    ):
        raise ValueError("`end_phrases` / `ban_phrases` need the engine's tokenizer")
    driver = _Driver(llm, rows, backstep, tokenizer, on_final)
    try:
        driver.run()
    except BaseException:
        live = [r.request_id for r in rows if r.request_id is not None and not r.done]
        if live:
            llm.llm_engine.abort_request(live)
        raise
    skip = True
    return [
        PerpetualRequestOutput(
            prompt_token_ids=row.prompt,
            token_ids=row.kept,
            text=tokenizer.decode(row.kept, skip_special_tokens=skip),
            finish_reason=row.finish_reason,
            backstep_events=row.events,
            stats=row.stats,
        )
        for row in rows
    ]
