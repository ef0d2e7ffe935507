"""What every backend shares: a job (one request on its way through a backend), its result, the text it streams,
and the interface the HTTP layer talks to."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ...backstep.config import BackstepConfig
from ..errors import APIError

__all__ = [
    "Backend",
    "IncrementalText",
    "Job",
    "Result",
    "RewindReport",
    "Sampling",
    "encode_chat",
    "encode_completion",
    "final_tokens",
]


@dataclass(frozen=True)
class Sampling:
    """The standard sampling fields of a request. ``temperature == 0`` is greedy decoding; ``top_k <= 0`` is off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class RewindReport:
    """What backstep did to one request: reported as the response's ``backstep`` field."""

    rewinds: int = 0
    removed_tokens: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, events: Sequence[Any]) -> RewindReport:
        """From the loop's :class:`~perpetual_logits.RewindEvent` list of one row."""
        reasons = Counter(str(e.reason) for e in events)
        return cls(len(events), sum(int(e.removed) for e in events), dict(sorted(reasons.items())))

    def as_json(self, preset: str) -> dict[str, Any]:
        removed = self.removed_tokens
        return {"preset": preset, "rewinds": self.rewinds, "removed_tokens": removed, "reasons": self.reasons}


@dataclass
class Result:
    """The final outcome of a job: ``completion_tokens`` counts the tokens returned (rewound ones excluded)."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop": the model ended it; "length": max_tokens reached
    rewinds: RewindReport | None


_IDS = itertools.count()


class Job:
    """One request inside a backend. The backend's thread reports to the request's event loop through
    :meth:`emit`: ``("delta", str)`` pieces of final text (streaming requests only), then ``("done", Result)`` or
    ``("error", APIError)``. :meth:`cancel` (client gone) is seen by the backend at its next step.

    Args:
        prompt_ids: the prompt's token ids (chat template applied).
        max_tokens: tokens to return at most.
        sampling: temperature, top-p, top-k, seed.
        backstep: the request's backstep settings, or ``None`` for plain sampling.
        preset: the name of the preset in force (reported back).
        stream: whether the client wants text as it becomes final.
        loop: the event loop of the request; events are delivered there.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: Sampling,
        backstep: BackstepConfig | None,
        preset: str,
        stream: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # -- the request
        self.id = next(_IDS)
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.backstep = backstep
        self.preset = preset
        self.stream = stream
        # -- delivery
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may share one ``generate()``. A seeded job runs alone: its tokens must not depend on
        which other requests happened to arrive with it."""
        alone = self.id if self.sampling.seed is not None else None
        return (self.sampling, self.max_tokens, repr(self.backstep), alone)

    def emit(self, kind: str, value: Any) -> None:
        """Thread-safe: queue an event for the request's coroutine (dropped when its loop is gone)."""
        with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        self.cancelled.set()


class IncrementalText:
    """The text of a growing list of final tokens, handed out as deltas that are never taken back.

    The whole list is decoded each time (a tokenizer may render a token differently depending on its
    neighbours, e.g. SentencePiece's leading space); a delta is released only when the new text extends what was
    released and does not end inside a multi-byte character.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
        skip: token ids that are not text (EOS).
    """

    def __init__(self, tokenizer: Any, skip: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip = frozenset(skip)
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def add(self, ids: Sequence[int]) -> str:
        """Append tokens; return the text that became final (possibly empty)."""
        self.ids.extend(int(i) for i in ids if int(i) not in self.skip)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def rest(self, final: str) -> str:
        """The part of the final text not yet released (all of it is released exactly once)."""
        delta = final[len(self.sent) :] if final.startswith(self.sent) else ""
        self.sent = final if final.startswith(self.sent) else self.sent
        return delta


def encode_completion(tokenizer: Any, prompt: str) -> list[int]:
    """A completion prompt's ids, special tokens (BOS) added as the tokenizer does by default (as vLLM does)."""
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], model_name: str) -> list[int]:
    """A conversation through the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            f"model {model_name!r} has no chat template: use /v1/completions, or start the server with --chat-template",
            param="messages",
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # a template may raise on a conversation it does not accept (e.g. roles)
        raise APIError(400, f"the chat template refused these messages: {err}", param="messages") from None
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def final_tokens(tokens: Sequence[int], eos: Sequence[int], max_tokens: int) -> tuple[list[int], str]:
    """A row's returned tokens (up to its first EOS, which is not text) and why it ended (``"stop"`` at an EOS,
    ``"length"`` at ``max_tokens``).

    Example:

    ```python
    >>> final_tokens([5, 6, 2, 0, 0], eos=[2], max_tokens=5), final_tokens([5, 6, 7], eos=[2], max_tokens=3)
    (([5, 6], 'stop'), ([5, 6, 7], 'length'))

    ```
    """
    ends = set(eos)
    stop = next((i for i, t in enumerate(tokens) if t in ends), None)
    if stop is not None:
        return [int(t) for t in tokens[:stop]], "stop"
    return [int(t) for t in tokens[:max_tokens]], "length"


@runtime_checkable
class Backend(Protocol):
    """What the HTTP layer needs from a backend."""

    model_name: str
    context_length: int

    def encode_completion(self, prompt: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def submit(self, job: Job) -> None:
        """Queue a job (raises :class:`~perpetual_logits.serve.errors.APIError` 429 when full, 503 when stopped)."""

    def cancel(self, job: Job) -> None: ...

    def healthy(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...
