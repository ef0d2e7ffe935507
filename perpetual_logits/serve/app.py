"""The HTTP layer: an ASGI app (Starlette) with the OpenAI routes, over any :class:`Backend`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true``: server-sent events
in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.

Every refusal is an OpenAI-style JSON error (``{"error": {"message", "type", "param", "code"}}``): 400 bad input
(naming the field), 401 API key, 404 unknown model or route, 405 wrong method, 413 body or prompt too large, 429
queue full, 503 not serving. A client that disconnects cancels its request, whether it waits in the queue or runs.

Responses carry one extra field, ``backstep``: ``{"preset", "rewinds", "removed_tokens", "reasons"}`` (``reasons``
counts rewinds by cause: ``eos``, ``ending``, ``phrase``, ``loop``), or ``null`` when the request ran without
backstep. ``usage.completion_tokens`` counts the tokens returned; rewound tokens are in ``removed_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .backends.base import Backend, Job, Result, Sampling
from .errors import APIError, error_body
from .methods import MethodDefaults, resolve_backstep
from .schemas import ChatCompletionRequest, CompletionRequest, parse_request

__all__ = ["ServerSettings", "create_app"]

log = logging.getLogger("perpetual_logits.serve")


@dataclass(frozen=True)
class ServerSettings:
    """Server-wide settings.

    Args:
        methods: the method defaults of requests (``--preset``, ``--backstep``).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        default_max_tokens: ``max_tokens`` of requests that give none (cut to what the context leaves).
        max_body_bytes: larger request bodies are refused with 413.
    """

    methods: MethodDefaults = field(default_factory=MethodDefaults)
    api_key: str | None = None
    default_max_tokens: int = 256
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("`api_key` must be a non-empty string or None")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < 1:
            raise ValueError(f"`default_max_tokens` must be an int >= 1, got {self.default_max_tokens!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"`max_body_bytes` must be an int >= 1024, got {self.max_body_bytes!r}")


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class _ApiKey:
    """ASGI middleware: ``/v1/*`` needs the bearer key (compared in constant time); ``/health`` does not."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
                await _error(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Handlers:
    """The route handlers, bound to one backend and one set of server settings."""

    def __init__(self, backend: Backend, settings: ServerSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.created = int(time.time())

    # -- reading a request -----------------------------------------------------------------------------------
    async def _json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is over {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over {limit} bytes")
        try:
            return json.loads(bytes(body))
        except (UnicodeDecodeError, ValueError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        except RecursionError:  # hostile nesting ([[[[...) exhausts the parser's stack
            raise APIError(400, "the request body nests JSON too deeply") from None

    def _check_model(self, name: str) -> None:
        if name != self.backend.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist: this server serves {self.backend.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _budget(self, prompt_ids: list[int], wanted: int | None, prompt_field: str, budget_field: str) -> int:
        context = self.backend.context_length
        if len(prompt_ids) >= context:
            raise APIError(
                413,
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens",
                param=prompt_field,
                code="context_length_exceeded",
            )
        room = context - len(prompt_ids)
        if wanted is None:
            return min(self.settings.default_max_tokens, room)
        if wanted > room:
            raise APIError(
                400,
                f"`{budget_field}` is {wanted}, but the prompt's {len(prompt_ids)} tokens leave {room} of this model's "
                f"{context}-token context",
                param=budget_field,
                code="context_length_exceeded",
            )
        return wanted

    def _job(self, req: Any, prompt_ids: list[int], max_tokens: int) -> Job:
        preset, config = resolve_backstep(self.settings.methods, req.preset, req.backstep)
        sampling = Sampling(req.temperature, req.top_p, req.top_k, req.seed)
        loop = asyncio.get_running_loop()
        return Job(prompt_ids, max_tokens, sampling, config, preset, req.stream, loop)

    # -- routes ----------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await self._json(request))
        self._check_model(req.model)
        prompt_ids = await asyncio.to_thread(self.backend.encode_completion, req.prompt_text())
        max_tokens = self._budget(prompt_ids, req.max_tokens, "prompt", "max_tokens")
        return await self._serve(request, req, self._job(req, prompt_ids, max_tokens), chat=False)

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await self._json(request))
        self._check_model(req.model)
        messages = [m.as_template_message() for m in req.messages]
        prompt_ids = await asyncio.to_thread(self.backend.encode_chat, messages)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._budget(prompt_ids, req.token_budget(), "messages", field)
        return await self._serve(request, req, self._job(req, prompt_ids, max_tokens), chat=True)

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.backend.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "perpetual-logits",
            "max_model_len": self.backend.context_length,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if self.backend.healthy():
            return JSONResponse({"status": "ok"})
        return _error(APIError(503, "the backend is not running", code="unavailable"))

    # -- answering -------------------------------------------------------------------------------------------
    async def _serve(self, request: Request, req: Any, job: Job, chat: bool) -> Response:
        self.backend.submit(job)
        head = _Head(chat, self.backend.model_name, len(job.prompt_ids), job.preset)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(
                self._stream(request, job, head, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            result = await _until_done(job, _disconnected(request))
        finally:
            self.backend.cancel(job)  # no-op once done; frees the slot when the client left or we failed
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(head.response(result))

    async def _stream(self, request: Request, job: Job, head: _Head, usage: bool) -> AsyncIterator[str]:
        try:
            if head.chat:
                yield _sse(head.chunk({"role": "assistant", "content": ""}, None))
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "delta":
                    yield _sse(head.chunk(value, None))
                elif kind == "error":
                    yield _sse(value.body())
                    break
                else:
                    result: Result = value
                    yield _sse(head.chunk("", result.finish_reason, result))
                    if usage:
                        yield _sse(head.usage_chunk(result))
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.backend.cancel(job)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until_done(job: Job, gone: Awaitable[None]) -> Result | None:
    """The job's result, or ``None`` when the client disconnects first; a backend error is raised."""
    watcher = asyncio.ensure_future(gone)
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return None
            kind, value = getter.result()
            if kind == "done":
                return value
            if kind == "error":
                raise value
    finally:
        watcher.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Head:
    """The fields every response and chunk of one request share, and their two shapes (chat, completion)."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, preset: str) -> None:
        self.chat = chat
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.preset = preset
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage(self, result: Result) -> dict[str, int]:
        n = result.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _backstep(self, result: Result) -> dict[str, Any] | None:
        return None if result.rewinds is None else result.rewinds.as_json(self.preset)

    def response(self, result: Result) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(result),
            "backstep": self._backstep(result),
        }

    def chunk(self, delta: Any, finish: str | None, result: Result | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
        else:
            choice["text"] = delta
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if result is not None:
            out["backstep"] = self._backstep(result)
        return out

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        out = self.chunk("", None)
        out["choices"] = []
        out["usage"] = self._usage(result)
        return out


def _guard(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every refusal as an OpenAI error; an unexpected failure as a 500 without a traceback (logged here)."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as err:
            return _error(err)
        except Exception:
            log.exception("request failed")
            return _error(APIError(500, "internal error (logged on the server)"))

    return guarded


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
    body = error_body(status, message.get(status, str(getattr(exc, "detail", "error"))))
    return JSONResponse(body, status_code=status)


def create_app(backend: Backend, settings: ServerSettings | None = None) -> Starlette:
    """The ASGI app serving ``backend``; the backend's worker starts and stops with the app.

    Args:
        backend: an :class:`~perpetual_logits.serve.backends.hf.HFBackend` or the vLLM backend.
        settings: server-wide settings (defaults: preset ``dynamic``, no API key).
    """
    settings = settings if settings is not None else ServerSettings()
    if not isinstance(backend, Backend):
        raise TypeError(f"`backend` must implement the serve Backend protocol, got {type(backend).__name__}")
    h = _Handlers(backend, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backend.start()
        try:
            yield
        finally:
            await asyncio.to_thread(backend.stop)

    routes = [
        Route("/v1/completions", _guard(h.completions), methods=["POST"]),
        Route("/v1/chat/completions", _guard(h.chat), methods=["POST"]),
        Route("/v1/models", _guard(h.models), methods=["GET"]),
        Route("/health", _guard(h.health), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_ApiKey, api_key=settings.api_key)],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
