"""From a request's ``preset`` and ``backstep`` fields (over the server's defaults) to a ``BackstepConfig``.

Resolution, field by field: the preset's values, then the server's ``--backstep`` defaults (only when the request
names no preset of its own), then the request's ``backstep`` fields. ``"none"`` is plain sampling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..app.methods import make_schedule
from ..backstep.config import BackstepConfig, LoopDetection
from .errors import APIError
from .schemas import PRESETS, BackstepSettings

__all__ = ["PRESET_FIELDS", "MethodDefaults", "resolve_backstep"]

_NAMED = re.compile(r"^`(\w+)`")

#: What each preset sets; every other field keeps :class:`~perpetual_logits.BackstepConfig`'s default.
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "none": {},
    "backstep": {"n_remove": 10, "schedule": "none"},
    "dynamic": {"n_remove": 10, "schedule": "linear", "peak": 2.0},
    "chat": {"n_remove": 12, "schedule": "linear", "peak": 1.6, "end_phrases": "chat", "loops": True},
}


@dataclass(frozen=True)
class MethodDefaults:
    """The server-wide method settings (``--preset`` and ``--backstep`` on the command line).

    Args:
        preset: the preset of requests that name none.
        backstep: field overrides applied on top of that preset.
    """

    preset: str = "dynamic"
    backstep: BackstepSettings | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.backstep is not None and not isinstance(self.backstep, BackstepSettings):
            raise ValueError(f"`backstep` must be BackstepSettings or None, got {self.backstep!r}")
        try:
            resolve_backstep(self, None, None)  # a bad default fails at start-up, not on every request
        except APIError as err:
            raise ValueError(err.message.replace("`backstep.", "`--backstep ")) from None


def _fields(settings: BackstepSettings | None) -> dict[str, Any]:
    return {} if settings is None else settings.model_dump(exclude_none=True)


def resolve_backstep(
    defaults: MethodDefaults, preset: str | None, overrides: BackstepSettings | None
) -> tuple[str, BackstepConfig | None]:
    """The preset in force and the ``BackstepConfig`` of one request (``None``: no backstep).

    Example:

    ```python
    >>> from perpetual_logits.serve.schemas import BackstepSettings
    >>> name, config = resolve_backstep(MethodDefaults("dynamic"), None, BackstepSettings(n_remove=4))
    >>> name, config.n_remove, config.schedule
    ('dynamic', 4, LinearDecay(peak=2.0, steps=4))
    >>> resolve_backstep(MethodDefaults("dynamic"), "none", None)
    ('none', None)

    ```
    """
    name = preset if preset is not None else defaults.preset
    if name == "none":
        if overrides is not None:
            raise APIError(400, "`backstep` settings need a preset other than 'none'", param="backstep")
        return name, None
    fields = dict(PRESET_FIELDS[name])
    if preset is None:
        fields.update(_fields(defaults.backstep))
    fields.update(_fields(overrides))
    n_remove = int(fields.pop("n_remove", 10))
    schedule_name = fields.pop("schedule", "none")
    peak = float(fields.pop("peak", 2.0))
    loops = fields.pop("loops", False)
    try:
        schedule = None if schedule_name == "none" else make_schedule(schedule_name, peak, n_remove)
        config = BackstepConfig(
            n_remove=n_remove, schedule=schedule, loops=LoopDetection() if loops else None, **fields
        )
    except ValueError as err:
        named = _NAMED.match(str(err))
        known = named is not None and named.group(1) in BackstepSettings.model_fields
        param = f"backstep.{named.group(1)}" if named is not None and known else "backstep"
        raise APIError(400, f"`{param}`: {err}", param=param) from None
    return name, config
