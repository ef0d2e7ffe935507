"""Per-request settings of the vLLM logits processor, carried in ``SamplingParams.extra_args``.

vLLM sends ``SamplingParams`` from the front-end process to the engine core (msgpack), so the settings are
plain data: lists of floats and ints, never ``Schedule`` objects. :func:`suppress_eos` and
:func:`resample_eos` build them for Methods 1 and 2; the backstep driver builds the rest (temperature schedule
from a position on, per-position bans). :class:`RequestSettings` parses and validates them; the processor
calls it for every new request and vLLM's ``validate_params`` hook calls it at admission, so a bad setting
fails the request with a ``ValueError`` instead of failing inside the sampler.

Nothing here imports vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import _validation
from .._moved import old_names
from ..schedules import MAX_MULTIPLIER, MIN_MULTIPLIER, Schedule
from ..triggers import EarlyTrigger
from ..truncation import Truncation, Widening

if not TYPE_CHECKING:  # the old name, for one release
    __getattr__ = old_names(
        __name__, {"KEY": (__name__, "EXTRA_ARGS_KEY"), "WidenSettings": (__name__, "WideningSettings")}
    )

__all__ = [
    "EXTRA_ARGS_KEY",
    "EarlySettings",
    "LandingSettings",
    "RequestSettings",
    "ScheduleTable",
    "WideningSettings",
    "resample_eos",
    "schedule_table",
    "suppress_eos",
]

#: The key of ``SamplingParams.extra_args`` this package reads; other keys are left to other processors.
EXTRA_ARGS_KEY = "perpetual_logits"

_TRIGGERS = ("sample", "argmax")


@dataclass(frozen=True)
class ScheduleTable:
    """A schedule as plain data: ``factors[s]`` for ``s < len(factors)``, then 1.0 (or ``factors[0]`` for ever).

    Args:
        factors (`tuple[float, ...]`): the multipliers from step 0 on, each in [0.001, 1000] (the bounds of the
            public schedule classes: a factor of 1e-300 would turn sampling into an overflow).
        forever (`bool`): the schedule never returns to 1.0 (``Constant``): every step uses ``factors[0]``.
    """

    factors: tuple[float, ...]
    forever: bool = False

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("`factors` must hold at least one multiplier")
        for f in self.factors:
            if (
                isinstance(f, bool)
                or not isinstance(f, (int, float))
                or not math.isfinite(f)
                or not MIN_MULTIPLIER <= f <= MAX_MULTIPLIER
            ):
                raise ValueError(
                    f"`factors` must hold floats in [{MIN_MULTIPLIER:g}, {MAX_MULTIPLIER:g}] (as the schedule "
                    f"classes do), got {f!r}"
                )
        if not isinstance(self.forever, bool):
            raise ValueError(f"`forever` must be a bool, got {self.forever!r}")

    def __call__(self, s: int) -> float:
        """The multiplier ``s`` steps after the trigger."""
        if self.forever:
            return float(self.factors[0])
        return float(self.factors[s]) if 0 <= s < len(self.factors) else 1.0

    def active(self, s: int) -> bool:
        """Whether step ``s`` is still inside the schedule (``Schedule.is_active``)."""
        return self.forever or s < len(self.factors)

    def to_data(self) -> dict[str, Any]:
        return {"factors": list(self.factors), "forever": self.forever}

    @classmethod
    def from_data(cls, data: object, name: str) -> ScheduleTable:
        if not isinstance(data, Mapping) or "factors" not in data:
            raise ValueError(f"`{name}` must be a dict with 'factors' (and 'forever'), got {data!r}")
        factors = data["factors"]
        if isinstance(factors, (str, bytes)) or not isinstance(factors, Iterable):
            raise ValueError(f"`{name}.factors` must be a list of floats, got {factors!r}")
        return cls(tuple(factors), bool(data.get("forever", False)))


@dataclass(frozen=True)
class EarlySettings:
    """An :class:`~perpetual_logits.EarlyTrigger` as plain data, plus where its history lives.

    The trigger watches a *row* (one prompt of the backstep driver) across its engine requests: a rewind is a
    new engine request, and the processor keeps each row's history under ``row`` so that a resubmission from
    generated position ``at`` drops the steps from ``at`` on and keeps the older ones -- what
    ``EarlyTrigger.rewind`` does on the HF backend.

    Args:
        window (`int`), eos_threshold (`float` or `None`), entropy_slope (`float` or `None`): as in
            :class:`~perpetual_logits.EarlyTrigger` (validated by it).
        row (`str`): the row's key, unique per driver row.
        at (`int`): the row's generated position of this engine request's first token.
    """

    window: int
    eos_threshold: float | None
    entropy_slope: float | None
    row: str
    at: int

    def __post_init__(self) -> None:
        self.trigger()  # EarlyTrigger validates the three statistics' settings and names the bad one
        if not isinstance(self.row, str) or not 0 < len(self.row) <= 200:
            raise ValueError(f"`early.row` must be a non-empty string of at most 200 characters, got {self.row!r}")
        _validation.positive_int(self.at, "early.at", minimum=0)

    def trigger(self) -> EarlyTrigger:
        """A fresh trigger with these settings."""
        return EarlyTrigger(self.window, self.eos_threshold, self.entropy_slope)

    def to_data(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "eos_threshold": self.eos_threshold,
            "entropy_slope": self.entropy_slope,
            "row": self.row,
            "at": self.at,
        }

    @classmethod
    def from_data(cls, data: object) -> EarlySettings:
        keys = {"window", "eos_threshold", "entropy_slope", "row", "at"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"`early` must be a dict with exactly the keys {sorted(keys)}, got {data!r}")
        return cls(data["window"], data["eos_threshold"], data["entropy_slope"], data["row"], data["at"])

    @classmethod
    def of(cls, trigger: EarlyTrigger, row: str, at: int) -> EarlySettings:
        """The settings of ``trigger`` for the engine request of ``row`` that starts at generated position ``at``."""
        if not isinstance(trigger, EarlyTrigger):
            raise ValueError(f"`trigger` must be an EarlyTrigger, got {trigger!r}")
        return cls(trigger.window, trigger.eos_threshold, trigger.entropy_slope, row, at)


@dataclass(frozen=True)
class LandingSettings:
    """The landing's EOS bonus (:class:`~perpetual_logits.Landing`) for one engine request, as plain data.

    From output index ``start`` on, a row whose previous token ends a sentence or a line (one of
    ``sentence_ends``) gets ``strength * min(1, (index - start + 1) / margin)`` added to its EOS logits: the HF
    backend's :class:`~perpetual_logits.backstep.landing.LandingBias`, judged on the token rather than on the
    decoded text (the driver's policy still decides on the text whether an EOS is accepted).

    Args:
        start (`int`): the output index where the bonus starts rising (0 or less: before this request).
        margin (`int`): tokens over which it rises.
        strength (`float`): the bonus once risen.
        sentence_ends (`tuple[int, ...]`): the token ids whose text ends with sentence punctuation or a newline.
        last_token (`int`): the token before this request's first output token (the prompt's last).
    """

    start: int
    margin: int
    strength: float
    sentence_ends: tuple[int, ...]
    last_token: int

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int):
            raise ValueError(f"`landing.start` must be an int, got {self.start!r}")
        _validation.positive_int(self.margin, "landing.margin")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not self.strength >= 0:
            raise ValueError(f"`landing.strength` must be a number >= 0, got {self.strength!r}")
        _validation.positive_int(self.last_token, "landing.last_token", minimum=0)
        for token in self.sentence_ends:
            _validation.positive_int(token, "landing.sentence_ends", minimum=0)

    def bonus(self, index: int) -> float:
        """The EOS bonus at output ``index`` for a row whose previous token ends a sentence (0 before ``start``)."""
        if index < self.start:
            return 0.0
        return float(self.strength) * min(1.0, (index - self.start + 1) / self.margin)

    def to_data(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "margin": self.margin,
            "strength": self.strength,
            "sentence_ends": list(self.sentence_ends),
            "last_token": self.last_token,
        }

    @classmethod
    def from_data(cls, data: object) -> LandingSettings:
        keys = {"start", "margin", "strength", "sentence_ends", "last_token"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"`landing` must be a dict with exactly the keys {sorted(keys)}, got {data!r}")
        ends = data["sentence_ends"]
        if isinstance(ends, (str, bytes)) or not isinstance(ends, Iterable):
            raise ValueError(f"`landing.sentence_ends` must be a list of token ids, got {ends!r}")
        return cls(data["start"], data["margin"], data["strength"], tuple(ends), data["last_token"])


@dataclass(frozen=True)
class WideningSettings:
    """:class:`~perpetual_logits.Widening` as plain data: the processor truncates each request itself.

    vLLM applies a request's top-k / top-p / min-p after the logits processors, with one value for the whole
    request, so it can only narrow what a processor leaves. A request with ``widen`` is therefore submitted with
    vLLM's truncation off, and the processor applies the configured values at every step -- in vLLM's order
    (min-p, top-k, top-p) and at the request's temperature, so a step that is not widened keeps exactly the
    tokens vLLM would have kept -- and the wider values after a schedule start, returning on ``weights``.

    Args:
        weights (`tuple[float, ...]`): ``w(s)`` by steps since the schedule started (1 = wide, 0 = configured),
            the last entry holding for later steps (see :mod:`perpetual_logits.truncation`).
        forever (`bool`): the weight schedule never ends: every step uses ``weights[0]``.
        wide (`Widening`): the values at the start (``None`` fields stay configured).
        configured (`Truncation`): the request's own top-k / top-p / min-p and temperature.
    """

    weights: tuple[float, ...]
    forever: bool
    wide: Widening
    configured: Truncation

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("`widen.weights` must hold at least one weight")
        for w in self.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
                raise ValueError(f"`widen.weights` must hold floats in [0, 1], got {w!r}")
        if not isinstance(self.forever, bool):
            raise ValueError(f"`widen.forever` must be a bool, got {self.forever!r}")
        if not isinstance(self.wide, Widening) or not isinstance(self.configured, Truncation):
            raise ValueError("`widen` needs a Widening and the configured Truncation")
        self.wide.check(self.configured)

    def weight(self, s: int) -> float:
        """``w`` at ``s`` steps after the schedule started."""
        if self.forever:
            return float(self.weights[0])
        return float(self.weights[min(max(s, 0), len(self.weights) - 1)])

    def values(self, w: float, vocab_size: int) -> tuple[int, float, float]:
        """``(top_k, top_p, min_p)`` at weight ``w``: ``TruncationSchedule.row_values`` for one row."""
        conf, wide = self.configured, self.wide
        k_conf = conf.top_k or vocab_size
        k_wide = k_conf if wide.top_k is None else (wide.top_k or vocab_size)
        top_k = round((1.0 - w) * k_conf + w * k_wide)
        top_p = (1.0 - w) * conf.top_p + w * (conf.top_p if wide.top_p is None else wide.top_p)
        min_p = (1.0 - w) * conf.min_p + w * (conf.min_p if wide.min_p is None else wide.min_p)
        return (0 if top_k >= vocab_size else top_k), top_p, min_p

    def to_data(self) -> dict[str, Any]:
        conf = self.configured
        return {
            "weights": list(self.weights),
            "forever": self.forever,
            "top_k": self.wide.top_k,
            "top_p": self.wide.top_p,
            "min_p": self.wide.min_p,
            "configured": {"top_k": conf.top_k, "top_p": conf.top_p, "min_p": conf.min_p, "temp": conf.temperature},
        }

    @classmethod
    def from_data(cls, data: object) -> WideningSettings:
        keys = {"weights", "forever", "top_k", "top_p", "min_p", "configured"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"`widen` must be a dict with exactly the keys {sorted(keys)}, got {data!r}")
        weights, conf = data["weights"], data["configured"]
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
            raise ValueError(f"`widen.weights` must be a list of floats, got {weights!r}")
        if not isinstance(conf, Mapping) or set(conf) != {"top_k", "top_p", "min_p", "temp"}:
            raise ValueError(f"`widen.configured` must be a dict of top_k, top_p, min_p, temp; got {conf!r}")
        wide = Widening(data["top_k"], data["top_p"], data["min_p"])
        configured = Truncation(conf["top_k"], conf["top_p"], conf["min_p"], conf["temp"])
        return cls(tuple(weights), data["forever"], wide, configured)

    @classmethod
    def of(cls, widen: Widening, schedule: Schedule, configured: Truncation) -> WideningSettings:
        """The settings of ``widen`` returning on ``widen.schedule`` (else ``schedule``), around ``configured``."""
        from ..truncation import weight_table

        if not isinstance(widen, Widening):
            raise ValueError(f"`widen` must be a Widening, got {widen!r}")
        chosen = widen.schedule if widen.schedule is not None else schedule
        if not isinstance(chosen, Schedule):
            raise ValueError(f"`schedule` must be a Schedule when `widen.schedule` is None, got {chosen!r}")
        weights = tuple(float(w) for w in weight_table(chosen).tolist())
        return cls(weights, chosen.length is None, Widening(widen.top_k, widen.top_p, widen.min_p), configured)


def schedule_table(schedule: Schedule) -> ScheduleTable:
    """The multipliers of a perpetual_logits ``Schedule`` as plain data.

    Example:

    ```python
    >>> from perpetual_logits import Constant, LinearDecay
    >>> schedule_table(LinearDecay(2.0, 4))
    ScheduleTable(factors=(2.0, 1.75, 1.5, 1.25), forever=False)
    >>> schedule_table(Constant(1.5)).forever
    True

    ```
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"`schedule` must be a perpetual_logits Schedule (e.g. LinearDecay), got {schedule!r}")
    length = schedule.length
    if length is None:
        return ScheduleTable((float(schedule(0)),), forever=True)
    if length == 0:
        return ScheduleTable((1.0,))
    return ScheduleTable(tuple(float(schedule(s)) for s in range(length)))


def _eos_data(eos_token_id: int | Iterable[int] | None) -> dict[str, Any]:
    if eos_token_id is None:
        return {}
    return {"eos": list(_validation.eos_ids(eos_token_id))}


def suppress_eos(eos_token_id: int | Iterable[int] | None = None) -> dict[str, Any]:
    """``extra_args`` for Method 1: EOS is never sampled.

    Args:
        eos_token_id (`int` or `list[int]`, *optional*): the ids to suppress. Defaults to every id that stops
            the request in vLLM (the model's EOS ids and the request's ``stop_token_ids``).

    Example:

    ```python
    >>> suppress_eos(2)
    {'perpetual_logits': {'suppress_eos': True, 'eos': [2]}}

    ```
    """
    return {EXTRA_ARGS_KEY: {"suppress_eos": True, **_eos_data(eos_token_id)}}


def resample_eos(
    eos_token_id: int | Iterable[int] | None = None,
    schedule: Schedule | None = None,
    trigger: str | float = "sample",
    seed: int | None = None,
) -> dict[str, Any]:
    """``extra_args`` for Method 2: EOS is evicted and the request samples hotter for a while.

    The same rule as :class:`~perpetual_logits.PostEOSResamplingLogitsProcessor`: an eviction restarts the
    request's multiplier at the schedule's peak (the replacement token is drawn at the peak), and the
    multiplier divides the raw logits, so it composes with ``SamplingParams.temperature``.

    Args:
        eos_token_id (`int` or `list[int]`, *optional*): as in :func:`suppress_eos`.
        schedule (`Schedule`, defaults to `LinearDecay(2.0, 10)`): multiplier per step since the eviction.
        trigger (`str` or `float`, defaults to `"sample"`): ``"sample"`` (evict with the EOS probability),
            ``"argmax"`` (EOS is the top token) or a float threshold in (0, 1] on the EOS probability.
        seed (`int`, *optional*): seeds the draws of the ``"sample"`` trigger; defaults to the request's
            ``SamplingParams.seed`` (unseeded when that is ``None`` too).

    Example:

    ```python
    >>> from perpetual_logits import LinearDecay
    >>> resample_eos(2, LinearDecay(2.0, 2), trigger="argmax")
    {'perpetual_logits': {'resample': {'factors': [2.0, 1.5], 'forever': False, 'trigger': 'argmax', 'seed': None},
                          'eos': [2]}}

    ```
    """
    from ..schedules import LinearDecay

    table = schedule_table(schedule if schedule is not None else LinearDecay(2.0, 10))
    _check_trigger(trigger)
    if seed is not None:
        _validation.positive_int(seed, "seed", minimum=0)
    return {
        EXTRA_ARGS_KEY: {"resample": {**table.to_data(), "trigger": trigger, "seed": seed}, **_eos_data(eos_token_id)}
    }


def _check_trigger(trigger: object) -> str | float:
    if isinstance(trigger, str):
        if trigger not in _TRIGGERS:
            raise ValueError(f"`trigger` must be 'sample', 'argmax' or a float threshold in (0, 1], got {trigger!r}")
        return trigger
    return _validation.probability(trigger, "trigger")


@dataclass(frozen=True)
class RequestSettings:
    """What the processor does for one request, parsed from ``extra_args[EXTRA_ARGS_KEY]``.

    Positions count the request's generated tokens (its output index), from 0.

    Args:
        eos (`tuple[int, ...]` or `None`): ids treated as EOS; ``None``: the request's stop ids.
        suppress_eos (`bool`): Method 1 at every position.
        resample (`ScheduleTable` or `None`): Method 2's schedule.
        trigger (`str` or `float`): Method 2's trigger.
        seed (`int` or `None`): seeds Method 2's ``"sample"`` trigger.
        schedule (`ScheduleTable` or `None`): the backstep driver's multiplier (Method 4).
        bans (`dict[int, tuple[int, ...]]`): tokens forbidden at given positions.
        started (`int` or `None`): the position where ``schedule`` started (0 or less: before this request;
            ``None``: not started, only an early trigger starts it). ``schedule["started"]``, default 0.
        early (`EarlySettings` or `None`): an early trigger that (re)starts ``schedule`` where it fires.
        widen (`WideningSettings` or `None`): per-request truncation, wider after each start of ``schedule``.
        landing (`LandingSettings` or `None`): the landing's EOS bonus at sentence ends.
    """

    eos: tuple[int, ...] | None = None
    suppress_eos: bool = False
    resample: ScheduleTable | None = None
    trigger: str | float = "sample"
    seed: int | None = None
    schedule: ScheduleTable | None = None
    bans: Mapping[int, tuple[int, ...]] | None = None
    started: int | None = 0
    early: EarlySettings | None = None
    widen: WideningSettings | None = None
    landing: LandingSettings | None = None

    @classmethod
    def parse(cls, extra_args: Mapping[str, Any] | None, vocab_size: int | None = None) -> RequestSettings | None:
        """The settings in ``extra_args``, or ``None`` when the request asks nothing of this processor.

        Args:
            extra_args: a request's ``SamplingParams.extra_args``.
            vocab_size (`int`, *optional*): when given, every token id (``eos``, ``bans``) must be below it.

        Raises:
            ValueError: a setting is malformed (the message names it).

        Example:

        ```python
        >>> RequestSettings.parse({"other": 1}) is None
        True
        >>> RequestSettings.parse({EXTRA_ARGS_KEY: {"bans": [[0, [2, 7]]], "schedule": {"factors": [2.0]}}})
        RequestSettings(eos=None, suppress_eos=False, resample=None, trigger='sample', seed=None,
                        schedule=ScheduleTable(factors=(2.0,), forever=False), bans={0: (2, 7)}, started=0,
                        early=None, widen=None, landing=None)
        >>> RequestSettings.parse({EXTRA_ARGS_KEY: {"supress_eos": True}})
        Traceback (most recent call last):
        ...
        ValueError: `extra_args['perpetual_logits']` has unknown keys ['supress_eos'] (known: ...)
        >>> RequestSettings.parse(suppress_eos(60000), vocab_size=49152)
        Traceback (most recent call last):
        ...
        ValueError: `extra_args['perpetual_logits']['eos']` holds the token id 60000, outside this model's ...

        ```
        """
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            return None
        data = extra_args[EXTRA_ARGS_KEY]
        if not isinstance(data, Mapping):
            raise ValueError(f"`extra_args[{EXTRA_ARGS_KEY!r}]` must be a dict, got {data!r}")
        known = {"bans", "early", "eos", "landing", "resample", "schedule", "suppress_eos", "widen"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"`extra_args[{EXTRA_ARGS_KEY!r}]` has unknown keys {unknown} (known: {sorted(known)})")
        eos = _validation.eos_ids(data["eos"], "eos") if data.get("eos") is not None else None
        suppress = data.get("suppress_eos", False)
        if not isinstance(suppress, bool):
            raise ValueError(f"`suppress_eos` must be a bool, got {suppress!r}")
        resample = trigger = seed = None
        if data.get("resample") is not None:
            spec = data["resample"]
            resample = ScheduleTable.from_data(spec, "resample")
            trigger = _check_trigger(spec.get("trigger", "sample"))
            seed = spec.get("seed")
            if seed is not None:
                seed = _validation.positive_int(seed, "resample.seed", minimum=0)
        schedule, started = None, 0
        if data.get("schedule") is not None:
            schedule = ScheduleTable.from_data(data["schedule"], "schedule")
            started = data["schedule"].get("started", 0)
            if started is not None and (isinstance(started, bool) or not isinstance(started, int) or started > 0):
                raise ValueError(f"`schedule.started` must be None or an int <= 0, got {started!r}")
        bans = _parse_bans(data.get("bans"))
        early = EarlySettings.from_data(data["early"]) if data.get("early") is not None else None
        widen = WideningSettings.from_data(data["widen"]) if data.get("widen") is not None else None
        if (early is not None or widen is not None) and schedule is None:
            raise ValueError("`early` and `widen` follow the temperature schedule: set `schedule` too")
        landing = LandingSettings.from_data(data["landing"]) if data.get("landing") is not None else None
        if vocab_size is not None:
            _check_vocabulary(eos, bans, vocab_size)
            outside = [t for t in landing.sentence_ends if t >= vocab_size] if landing is not None else []
            if outside:
                raise ValueError(
                    f"`extra_args[{EXTRA_ARGS_KEY!r}]['landing']['sentence_ends']` holds the token id {outside[0]}, "
                    f"outside this model's vocabulary (ids 0 to {vocab_size - 1})"
                )
        if not (suppress or resample or schedule or bans or landing):
            return None
        return cls(
            eos,
            suppress,
            resample,
            trigger if trigger is not None else "sample",
            seed,
            schedule,
            bans,
            started,
            early,
            widen,
            landing,
        )


def _check_vocabulary(eos: tuple[int, ...] | None, bans: Mapping[int, tuple[int, ...]] | None, vocab: int) -> None:
    """Refuse token ids the model does not have (the worker would index outside its logits)."""
    named = [("eos", eos or ())] + [("bans", tokens) for tokens in (bans or {}).values()]
    for name, ids in named:
        for token in ids:
            if token >= vocab:
                raise ValueError(
                    f"`extra_args[{EXTRA_ARGS_KEY!r}][{name!r}]` holds the token id {token}, outside this model's "
                    f"vocabulary (ids 0 to {vocab - 1})"
                )


def _parse_bans(data: object) -> dict[int, tuple[int, ...]] | None:
    """``[[position, [token, ...]], ...]`` (msgpack keeps lists; dict keys would have to be strings)."""
    if data is None:
        return None
    accepted = "`bans` must be a list of [position, [token ids]] pairs"
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(f"{accepted}, got {data!r}")
    bans: dict[int, set[int]] = {}
    for pair in data:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable) or len(list(pair)) != 2:
            raise ValueError(f"{accepted}, got the item {pair!r}")
        pos, tokens = list(pair)
        pos = _validation.positive_int(pos, "bans position", minimum=0)
        bans.setdefault(pos, set()).update(_validation.eos_ids(tokens, "bans tokens"))
    return {pos: tuple(sorted(tokens)) for pos, tokens in bans.items()} or None
