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
from typing import Any

from .. import _validation
from ..schedules import Schedule

__all__ = ["KEY", "RequestSettings", "ScheduleTable", "resample_eos", "schedule_table", "suppress_eos"]

#: The key of ``SamplingParams.extra_args`` this package reads; other keys are left to other processors.
KEY = "perpetual_logits"

_TRIGGERS = ("sample", "argmax")


@dataclass(frozen=True)
class ScheduleTable:
    """A schedule as plain data: ``factors[s]`` for ``s < len(factors)``, then 1.0 (or ``factors[0]`` for ever).

    Args:
        factors (`tuple[float, ...]`): the multipliers from step 0 on; all > 0.
        forever (`bool`): the schedule never returns to 1.0 (``Constant``): every step uses ``factors[0]``.
    """

    factors: tuple[float, ...]
    forever: bool = False

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("`factors` must hold at least one multiplier")
        for f in self.factors:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
                raise ValueError(f"`factors` must hold finite floats > 0, got {f!r}")
        if not isinstance(self.forever, bool):
            raise ValueError(f"`forever` must be a bool, got {self.forever!r}")

    def __call__(self, s: int) -> float:
        """The multiplier ``s`` steps after the trigger."""
        if self.forever:
            return float(self.factors[0])
        return float(self.factors[s]) if 0 <= s < len(self.factors) else 1.0

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
    return {KEY: {"suppress_eos": True, **_eos_data(eos_token_id)}}


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
    return {KEY: {"resample": {**table.to_data(), "trigger": trigger, "seed": seed}, **_eos_data(eos_token_id)}}


def _check_trigger(trigger: object) -> str | float:
    if isinstance(trigger, str):
        if trigger not in _TRIGGERS:
            raise ValueError(f"`trigger` must be 'sample', 'argmax' or a float threshold in (0, 1], got {trigger!r}")
        return trigger
    return _validation.probability(trigger, "trigger")


@dataclass(frozen=True)
class RequestSettings:
    """What the processor does for one request, parsed from ``extra_args[KEY]``.

    Positions count the request's generated tokens (its output index), from 0.

    Args:
        eos (`tuple[int, ...]` or `None`): ids treated as EOS; ``None``: the request's stop ids.
        suppress_eos (`bool`): Method 1 at every position.
        resample (`ScheduleTable` or `None`): Method 2's schedule.
        trigger (`str` or `float`): Method 2's trigger.
        seed (`int` or `None`): seeds Method 2's ``"sample"`` trigger.
        schedule (`ScheduleTable` or `None`): a multiplier from position 0 on (the backstep driver's Method 4).
        bans (`dict[int, tuple[int, ...]]`): tokens forbidden at given positions.
    """

    eos: tuple[int, ...] | None = None
    suppress_eos: bool = False
    resample: ScheduleTable | None = None
    trigger: str | float = "sample"
    seed: int | None = None
    schedule: ScheduleTable | None = None
    bans: Mapping[int, tuple[int, ...]] | None = None

    @classmethod
    def parse(cls, extra_args: Mapping[str, Any] | None) -> RequestSettings | None:
        """The settings in ``extra_args``, or ``None`` when the request asks nothing of this processor.

        Raises:
            ValueError: a setting is malformed (the message names it).

        Example:

        ```python
        >>> RequestSettings.parse({"other": 1}) is None
        True
        >>> RequestSettings.parse({KEY: {"bans": [[0, [2, 7]]], "schedule": {"factors": [2.0]}}})
        RequestSettings(eos=None, suppress_eos=False, resample=None, trigger='sample', seed=None,
                        schedule=ScheduleTable(factors=(2.0,), forever=False), bans={0: (2, 7)})
        >>> RequestSettings.parse({KEY: {"supress_eos": True}})
        Traceback (most recent call last):
        ...
        ValueError: `extra_args['perpetual_logits']` has unknown keys ['supress_eos'] (known: ...)

        ```
        """
        if not extra_args or KEY not in extra_args:
            return None
        data = extra_args[KEY]
        if not isinstance(data, Mapping):
            raise ValueError(f"`extra_args[{KEY!r}]` must be a dict, got {data!r}")
        known = {"bans", "eos", "resample", "schedule", "suppress_eos"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"`extra_args[{KEY!r}]` has unknown keys {unknown} (known: {sorted(known)})")
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
        schedule = ScheduleTable.from_data(data["schedule"], "schedule") if data.get("schedule") is not None else None
        bans = _parse_bans(data.get("bans"))
        if not (suppress or resample or schedule or bans):
            return None
        return cls(eos, suppress, resample, trigger if trigger is not None else "sample", seed, schedule, bans)


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
