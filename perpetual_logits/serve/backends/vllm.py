"""The vLLM backend: vLLM's async engine (``AsyncLLM``), one asyncio task per request.

vLLM cannot rewind a running request; the offline driver (:mod:`perpetual_logits.vllm.driver`) cuts a request
back and resubmits it (prompt + kept tokens, prefix-cached) with our processor's settings for the rewound
position. This backend reuses that driver unchanged, one driver per request: the driver decides, from every
output the engine returns, whether to keep, finish or rewind (the rules are the shared rewind policy, the same
as on the HF backend), and its two engine calls -- ``add_request`` and ``abort_request`` -- are routed to the
async engine. Each request's task resubmits after a rewind while the engine keeps decoding the others
(continuous batching); prefix caching is on, so a resubmission recomputes at most a block of its prompt.

Streaming: the driver reports a request's tokens once they are final (hold-back), so streams never retract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from typing import Any

from ..errors import APIError
from .base import IncrementalText, Job, Result, RewindReport, encode_chat, encode_completion, final_tokens

__all__ = ["VLLMBackend"]

log = logging.getLogger("perpetual_logits.serve")


class _EngineCalls:
    """What the driver calls on vLLM's synchronous engine, recorded for the request's task to carry out on the
    async engine: the request to submit next, and the requests to abort."""

    def __init__(self, model_config: Any) -> None:
        self.model_config = model_config
        self.added: dict[str, tuple[Any, Any]] = {}
        self.aborted: list[str] = []

    def add_request(self, request_id: str, prompt: Any, params: Any) -> None:
        self.added[request_id] = (prompt, params)

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)


class _EngineView:
    """The part of ``vllm.LLM`` the driver reads: ``llm_engine`` and ``get_tokenizer()``."""

    def __init__(self, calls: _EngineCalls, tokenizer: Any) -> None:
        self.llm_engine = calls
        self.tokenizer = tokenizer

    def get_tokenizer(self) -> Any:
        return self.tokenizer


class VLLMBackend:
    """Serve a model with vLLM's ``AsyncLLM`` and our logits processor.

    Args:
        model: a transformers model folder (as for ``vllm serve``).
        model_name: the name clients pass as ``model``.
        max_queue: requests in the engine at most (running or waiting); more are refused with 429.
        context_length: ``max_model_len`` of the engine (defaults to the model's).
        chat_template: a Jinja chat template replacing (or supplying) the tokenizer's.
        engine_args: more ``AsyncEngineArgs`` fields (e.g. ``{"kv_cache_memory_bytes": ...}`` on CPU).
    """

    def __init__(
        self,
        model: str,
        model_name: str,
        max_queue: int = 256,
        context_length: int | None = None,
        chat_template: str | None = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"`max_queue` must be an int >= 1, got {max_queue!r}")
        if engine_args is not None and not isinstance(engine_args, dict):
            raise ValueError(f"`engine_args` must be a dict of AsyncEngineArgs fields, got {engine_args!r}")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ValueError("--backend vllm needs vLLM installed (see requirements-vllm.txt)") from None
        from transformers import AutoTokenizer

        # -- the model
        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.engine_args = dict(engine_args or {})
        if context_length is not None:
            self.engine_args["max_model_len"] = context_length
        self.engine: Any = None
        self.eos: list[int] = []
        # -- what clients see
        self.model_name = model_name
        self.context_length = int(context_length or 0)
        # -- requests
        self.max_queue = max_queue
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        # -- counters (read by tests and benchmarks)
        self.rows = 0
        self.aborted = 0
        self.submissions = 0

    # -- engine life -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.engine is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ...vllm.driver import eos_token_ids
        from ...vllm.processor import PerpetualLogitsProcessor

        args = {"enable_prefix_caching": True, **self.engine_args}
        processors = list(args.pop("logits_processors", None) or [])
        if PerpetualLogitsProcessor not in processors:
            processors.append(PerpetualLogitsProcessor)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=self.model, logits_processors=processors, **args))
        self.context_length = int(self.engine.model_config.max_model_len)
        self.eos = list(eos_token_ids(_EngineView(_EngineCalls(self.engine.model_config), self.tokenizer)))
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.get_loop().call_soon_threadsafe(task.cancel)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def healthy(self) -> bool:
        return self.engine is not None and not self.stopping and not self.engine.errored

    # -- prompts -------------------------------------------------------------------------------------------
    def encode_completion(self, prompt: str) -> list[int]:
        return encode_completion(self.tokenizer, prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.model_name)

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if not self.healthy():
            raise APIError(503, "the server is not accepting requests", code="unavailable")
        if len(self.tasks) >= self.max_queue:
            raise APIError(429, f"{self.max_queue} requests are in progress: retry later", code="queue_full")
        task = asyncio.get_running_loop().create_task(self._drive(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel(self, job: Job) -> None:
        job.cancel()  # the job's task sees it at its next engine output and aborts its engine request

    async def _drive(self, job: Job) -> None:
        try:
            result = await self._generate(job)
            if result is not None:
                job.emit("done", result)
        except asyncio.CancelledError:
            job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))
        except APIError as err:
            job.emit("error", err)
        except Exception as err:  # one failed request must not stop the server: report it to its client
            log.exception("generation failed")
            status = 400 if type(err).__name__ in ("ValueError", "VLLMValidationError") else 500
            job.emit("error", APIError(status, f"generation failed: {type(err).__name__}: {err}"))

    async def _generate(self, job: Job) -> Result | None:
        from vllm import SamplingParams

        from ...vllm import driver as offline

        sampling = job.sampling
        params = SamplingParams(
            max_tokens=job.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            seed=sampling.seed,
        )
        calls = _EngineCalls(self.engine.model_config)
        text = IncrementalText(self.tokenizer, self.eos)

        def on_final(index: int, ids: list[int]) -> None:
            delta = text.add(ids)
            if delta and job.stream and not job.cancelled.is_set():
                job.emit("delta", delta)

        row = offline.Row(0, list(job.prompt_ids), params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # settings vLLM cannot honour were refused at validation already
            driver = offline.Driver(_EngineView(calls, self.tokenizer), [row], job.backstep, self.tokenizer, on_final)
        self.rows += 1
        driver.submit(row)
        try:
            while not row.done:
                request_id = row.request_id
                assert request_id is not None
                prompt, engine_params = calls.added.pop(request_id)
                self.submissions += 1
                stream = self.engine.generate(prompt, engine_params, request_id)
                async with contextlib.aclosing(stream):  # closing it early aborts the engine request
                    async for output in stream:
                        if job.cancelled.is_set():
                            self.aborted += 1
                            return None
                        driver.on_output(row, output)
                        if row.done or row.request_id != request_id:
                            break
                for stale in calls.aborted:
                    if stale != request_id:
                        await self.engine.abort(stale)
                calls.aborted.clear()
                if not row.done and row.request_id == request_id:
                    raise RuntimeError(f"the engine ended request {request_id} without a finished output")
        finally:
            live = [r for r in calls.added if r != row.request_id]
            if live:
                await self.engine.abort(live)
        tokens, finish = final_tokens(list(row.kept), self.eos, job.max_tokens)
        final = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
        rest = text.rest(final)
        if rest and job.stream:
            job.emit("delta", rest)
        if finish == "length" and row.finish_reason == "stop":
            finish = "stop"  # a stop condition of the engine ended it exactly at max_tokens
        events = driver.events(row) if hasattr(driver, "events") else getattr(row, "events", [])
        report = RewindReport.of(events) if job.backstep is not None else None
        return Result(final, len(tokens), finish, report)
