"""``perpetual-logits serve``: build the backend and the app from the command line's options, run uvicorn."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .app import ServerSettings, create_app
from .backends.base import Backend
from .methods import MethodDefaults
from .schemas import BackstepSettings

__all__ = ["ServeOptions", "build_backend", "run", "running"]

API_KEY_ENV = "PERPETUAL_LOGITS_API_KEY"


@dataclass(frozen=True)
class ServeOptions:
    """The ``serve`` subcommand's options (see ``perpetual-logits serve --help``)."""

    model: str
    backend: str = "hf"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    preset: str = "dynamic"
    backstep: str | None = None  # JSON object, the request's "backstep" fields
    max_batch: int = 16
    max_queue: int = 256
    batch_wait_ms: float = 10.0
    max_model_len: int | None = None
    chat_template: str | None = None  # a file, or the template itself
    default_max_tokens: int = 256
    vllm_args: str | None = None  # JSON object of more AsyncEngineArgs fields


def _method_defaults(options: ServeOptions) -> MethodDefaults:
    fields = None
    if options.backstep is not None:
        try:
            raw = json.loads(options.backstep)
        except ValueError as err:
            raise ValueError(f"`--backstep` must be a JSON object: {err}") from None
        from .errors import APIError
        from .schemas import parse_request

        try:
            fields = parse_request(BackstepSettings, raw)
        except APIError as err:
            raise ValueError(f"`--backstep`: {err.message}") from None
    return MethodDefaults(options.preset, fields)


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise ValueError(f"`--chat-template` must be a file or a Jinja template, got {value!r}")
    return value


def build_backend(options: ServeOptions) -> Backend:
    """Load the model and build the backend the options name."""
    name = options.served_model_name or Path(options.model.rstrip("/")).name or options.model
    template = _chat_template(options.chat_template)
    if options.backend == "hf":
        from ..app.running import load_model
        from .backends.hf import HFBackend

        return HFBackend(
            load_model(options.model),
            name,
            max_batch=options.max_batch,
            max_queue=options.max_queue,
            batch_wait=options.batch_wait_ms / 1000,
            context_length=options.max_model_len,
            chat_template=template,
        )
    if options.backend == "vllm":
        from .backends.vllm import VLLMBackend

        engine_args = None
        if options.vllm_args is not None:
            try:
                engine_args = json.loads(options.vllm_args)
            except ValueError as err:
                raise ValueError(f"`--vllm-args` must be a JSON object: {err}") from None
            if not isinstance(engine_args, dict):
                raise ValueError(f"`--vllm-args` must be a JSON object, got {options.vllm_args!r}")
        return VLLMBackend(
            options.model,
            name,
            max_queue=options.max_queue,
            context_length=options.max_model_len,
            chat_template=template,
            engine_args=engine_args,
        )
    raise ValueError(f"`--backend` must be 'hf' or 'vllm', got {options.backend!r}")


def run(options: ServeOptions) -> int:
    """Serve until interrupted (uvicorn handles Ctrl-C and SIGTERM gracefully)."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("the serve command needs the [serve] extra: pip install 'perpetual-logits[serve]'") from None
    api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    settings = ServerSettings(_method_defaults(options), api_key, options.default_max_tokens)
    backend = build_backend(options)
    app: Any = create_app(backend, settings)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread for the duration of a ``with`` block; yields the base URL
    (``port=0``: a free port). For tests, notebooks and benchmarks; the command line uses :func:`run`.

    Args:
        app: the ASGI app (:func:`~perpetual_logits.serve.create_app`).
        host: the address to bind (loopback by default).
        port: the port, 0 for any free one.
        timeout: seconds to wait for start-up and for shutdown.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="perpetual-logits-serve", daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
