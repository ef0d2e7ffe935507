"""Request bodies of the OpenAI-compatible endpoints, validated strictly, and the method settings they carry.

Every request model forbids unknown fields and coerces nothing (``"5"`` is not an int, ``true`` is not a
number): a typo in a field name is an error naming the field, never a silently ignored setting. Our method
settings sit next to the standard fields, the way vLLM takes its extra sampling fields:

* ``"preset"``: ``"none"`` (plain sampling), ``"backstep"`` (Method 3), ``"dynamic"`` (Method 4) or ``"chat"``
  (:meth:`~perpetual_logits.BackstepConfig.chat`: Method 4, endings rewound like EOS, loop rewinds);
* ``"backstep"``: fields that override the preset (:class:`BackstepSettings`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..schedules import MAX_MULTIPLIER, MIN_MULTIPLIER
from .errors import APIError

__all__ = [
    "PRESETS",
    "BackstepSettings",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "parse_request",
]

#: The named method presets a request (or the server's ``--preset``) may choose.
PRESETS = ("none", "backstep", "dynamic", "chat")
MAX_SEED = 2**32 - 1
MAX_PHRASES = 256
MAX_PHRASE_CHARS = 256
_LIMIT = 1_000_000

_STRICT = ConfigDict(extra="forbid", strict=True)
Phrase = Annotated[str, Field(min_length=1, max_length=MAX_PHRASE_CHARS)]
Text = Annotated[str, Field(min_length=1)]
PhraseList = Annotated[list[Phrase], Field(min_length=1, max_length=MAX_PHRASES)]


class BackstepSettings(BaseModel):
    """Per-request backstep settings (every field optional: the preset's value applies when left out).

    ``schedule`` names the temperature schedule after a rewind (``"linear"``, ``"step"``, ``"cosine"``,
    ``"exponential"``, ``"constant"``; ``"none"`` is Method 3), ``peak`` its multiplier right after the rewind,
    and it lasts ``n_remove`` tokens. ``loops: true`` turns loop rewinds on with their defaults. The other fields
    are :class:`~perpetual_logits.BackstepConfig`'s.
    """

    model_config = _STRICT

    n_remove: Annotated[int, Field(ge=1, le=4096)] | None = None
    schedule: Literal["none", "linear", "step", "cosine", "exponential", "constant"] | None = None
    peak: Annotated[float, Field(ge=MIN_MULTIPLIER, le=MAX_MULTIPLIER, allow_inf_nan=False)] | None = None
    max_backsteps: Annotated[int, Field(ge=0, le=_LIMIT)] | None = None
    on_exhausted: Literal["suppress", "stop"] | None = None
    ban_rewound_token: bool | None = None
    hold_back: Annotated[int, Field(ge=1, le=8192)] | None = None
    end_phrases: Literal["default", "chat"] | PhraseList | None = None
    ban_phrases: Literal["default"] | PhraseList | None = None
    max_phrase_rewinds: Annotated[int, Field(ge=0, le=_LIMIT)] | None = None
    loops: bool | None = None


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share: the model, sampling, streaming and our method settings."""

    model_config = _STRICT

    model: Annotated[str, Field(min_length=1, max_length=512)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=MAX_MULTIPLIER, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=_LIMIT)] = 0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=512)] | None = None
    preset: Literal["none", "backstep", "dynamic", "chat"] | None = None
    backstep: BackstepSettings | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (a string, or a list holding one string)."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: Annotated[str, Field(max_length=256)] | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the conversation goes through the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- turning pydantic's errors into one line naming the field ---------------------------------------------------
_TYPE_TAG = re.compile(r"^[a-z_][a-z0-9_]*$")
_NOT_FIELDS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "constrained-str"}


def _param(loc: tuple[Any, ...]) -> str:
    """The field path of a validation error: ``backstep.n_remove``, ``messages[0].role`` (union branch tags that
    pydantic puts in the location, such as ``list[str]``, are dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _TYPE_TAG.match(part) and part not in _NOT_FIELDS:
            out += f".{part}" if out else part
    return out


def parse_request(model: type[BaseModel], body: object) -> Any:
    """Validate a decoded JSON body; any problem is an :class:`APIError` (400) naming the first bad field.

    Example:

    ```python
    >>> parse_request(CompletionRequest, {"model": "m", "prompt": "Hi", "max_tokens": 0})
    Traceback (most recent call last):
    ...
    perpetual_logits.serve.errors.APIError: `max_tokens`: Input should be greater than or equal to 1 (got 0)
    >>> parse_request(CompletionRequest, {"model": "m", "prompt": "Hi", "backstep": {"n_remov": 3}})
    Traceback (most recent call last):
    ...
    perpetual_logits.serve.errors.APIError: `backstep.n_remov`: unknown field

    ```
    """
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        # Of a union's branches, report the one that got furthest into the value, and among those one whose
        # complaint is about the content rather than the kind of value: the most specific message.
        first = min(errors, key=lambda e: (-len(e["loc"]), e["type"].endswith("_type")))
        param = _param(tuple(first["loc"]))
        if first["type"] == "extra_forbidden":
            message = f"`{param}`: unknown field"
        elif first["type"] == "missing":
            message = f"`{param}`: required field missing"
        else:
            got = first.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            message = f"`{param}`: {first['msg']} (got {shown[:80]})"
        raise APIError(400, message, param=param or None) from None
