"""An OpenAI-compatible HTTP server with backstep: ``perpetual-logits serve --model PATH`` (the ``[serve]`` extra).

:func:`create_app` builds the ASGI app over a backend (:class:`~perpetual_logits.serve.backends.hf.HFBackend`:
transformers on a worker thread; ``backends.vllm``: vLLM's async engine); :func:`running` serves it on a
background thread (tests, notebooks); ``perpetual-logits serve`` runs it in the foreground.
"""

from __future__ import annotations

from .app import ServerSettings, create_app
from .errors import APIError
from .methods import MethodDefaults
from .server import running

__all__ = ["APIError", "MethodDefaults", "ServerSettings", "create_app", "running"]
