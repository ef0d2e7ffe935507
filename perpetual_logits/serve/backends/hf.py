"""The embedded backend: one transformers model (made perpetual) on one worker thread.

Requests queue in a bounded queue. The worker takes the oldest job and every other queued job with the same
settings (same sampling, ``max_tokens`` and backstep config; up to ``max_batch``) and runs them as one left-padded
``generate()``; the rest wait for the next round. Only the worker thread touches the model, so the model needs no
lock. A cancelled job (client gone) leaves the queue at once, or, when already running, its row is finished by a
stopping criterion at the next step: the batch goes on without it.

Streaming: a :class:`RowStreamer` receives each row's *final* tokens (the backstep loop's hold-back: a token is
handed over only once no rewind can remove it, see :mod:`perpetual_logits.backstep.streaming`), so a stream never
shows text that is later taken back, and rows of one batch stream independently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ...app.running import LoadedModel
from ...mixin import make_perpetual
from ..errors import APIError
from .base import IncrementalText, Job, Result, RewindReport, encode_chat, encode_completion, final_tokens

__all__ = ["HFBackend", "RowStreamer"]

log = logging.getLogger("perpetual_logits.serve")


class Cancelled(StoppingCriteria):
    """Finishes the rows whose client went away (checked at every step)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = [job.cancelled.is_set() for job in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class RowStreamer:
    """A streamer for a batch: each row's final tokens go to its own job as text deltas.

    The backstep loop calls :meth:`put_row` (only final tokens, per row). Plain ``generate()`` calls :meth:`put`:
    first with the prompt (ignored), then with one token per row per step, padding after a row's EOS.

    Args:
        jobs: one job per row.
        tokenizer: decodes the text.
        eos: the end-of-sequence ids (not text; a row ends at its first).
    """

    def __init__(self, jobs: list[Job], tokenizer: Any, eos: list[int]) -> None:
        self.jobs = jobs
        self.eos = frozenset(eos)
        self.texts = [IncrementalText(tokenizer, eos) for _ in jobs]
        self.ended = [False] * len(jobs)
        self.prompt_seen = False

    def put_row(self, row: int, tokens: torch.Tensor) -> None:
        if self.ended[row]:
            return
        ids = [int(t) for t in tokens.reshape(-1).tolist()]
        if any(t in self.eos for t in ids):
            ids = ids[: next(i for i, t in enumerate(ids) if t in self.eos)]
            self.ended[row] = True
        delta = self.texts[row].add(ids)
        job = self.jobs[row]
        if delta and job.stream and not job.cancelled.is_set():
            job.emit("delta", delta)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 2 and not self.prompt_seen:  # plain generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.put_row(row, torch.tensor([token]))

    def end(self) -> None:
        """Nothing to flush: every token was final when it arrived."""


class HFBackend:
    """Serve one transformers model from a worker thread, batching requests with equal settings.

    Args:
        loaded: the model and tokenizer (:func:`perpetual_logits.app.running.load_model`).
        model_name: the name clients pass as ``model``.
        max_batch: requests run together in one ``generate()`` at most.
        max_queue: requests waiting at most; more are refused with 429.
        batch_wait: seconds the worker waits after the first request of a round for others to arrive.
        context_length: prompt + completion tokens allowed (defaults to the model's position limit).
        chat_template: a Jinja chat template replacing (or supplying) the tokenizer's.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        model_name: str,
        max_batch: int = 16,
        max_queue: int = 256,
        batch_wait: float = 0.01,
        context_length: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"`max_batch` must be an int >= 1, got {max_batch!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"`max_queue` must be an int >= 1, got {max_queue!r}")
        if not 0 <= batch_wait <= 10:
            raise ValueError(f"`batch_wait` must be in [0, 10] seconds, got {batch_wait!r}")
        limit = context_length or loaded.max_positions
        if limit is None:
            raise ValueError("the model states no position limit: pass `context_length` (--max-model-len)")
        if not isinstance(limit, int) or limit < 2:
            raise ValueError(f"`context_length` must be an int >= 2, got {limit!r}")
        # -- the model (touched by the worker thread only)
        self.model = make_perpetual(loaded.model)
        self.tokenizer = loaded.tokenizer
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.eos = list(loaded.eos)
        self.pad = loaded.pad
        self.device = next(self.model.parameters()).device
        # -- what clients see
        self.model_name = model_name
        self.context_length = int(limit)
        # -- scheduling
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.queue: deque[Job] = deque()
        self.lock = threading.Condition()
        self.running: list[Job] = []
        self.stopping = False
        self.worker: threading.Thread | None = None
        # -- counters (read by tests and benchmarks)
        self.batches = 0  # generate() calls
        self.rows = 0  # requests run
        self.aborted = 0  # requests whose client left while they ran
        self.stream_mismatches = 0  # streams whose text differs from the final text (0 by design)

    # -- prompts -------------------------------------------------------------------------------------------
    def encode_completion(self, prompt: str) -> list[int]:
        return encode_completion(self.tokenizer, prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.model_name)

    # -- the queue -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.worker is not None:
            return
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="perpetual-logits-hf", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for job in self.queue:
                job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))
            self.queue.clear()
            for job in self.running:
                job.cancel()
            self.lock.notify_all()
        if self.worker is not None:
            self.worker.join(timeout=30)
            self.worker = None

    def healthy(self) -> bool:
        return self.worker is not None and self.worker.is_alive() and not self.stopping

    def submit(self, job: Job) -> None:
        with self.lock:
            if not self.healthy():
                raise APIError(503, "the server is not accepting requests", code="unavailable")
            if len(self.queue) >= self.max_queue:
                raise APIError(
                    429, f"the queue is full ({self.max_queue} requests waiting): retry later", code="queue_full"
                )
            self.queue.append(job)
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self.lock:
            if job in self.queue:
                self.queue.remove(job)

    def pending(self) -> int:
        with self.lock:
            return len(self.queue)

    # -- the worker ----------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        with self.lock:
            while not self.queue and not self.stopping:
                self.lock.wait()
            if self.stopping:
                return None
            first = self.queue[0]
        # Requests that arrive together run together: give the others a moment to arrive.
        wait = self.batch_wait - (time.monotonic() - first.submitted)
        if wait > 0:
            time.sleep(wait)
        with self.lock:
            if self.stopping:
                return None
            if not self.queue:
                return []
            first = self.queue.popleft()
            key = first.batch_key()
            batch = [first]
            for job in list(self.queue):
                if len(batch) >= self.max_batch:
                    break
                if job.batch_key() == key:
                    batch.append(job)
                    self.queue.remove(job)
            self.running = batch
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            jobs = [job for job in batch if not job.cancelled.is_set()]
            try:
                if jobs:
                    self._run(jobs)
            except Exception as err:  # one failed batch must not stop the server: report it to its clients
                log.exception("generation failed")
                for job in jobs:
                    job.emit("error", APIError(500, f"generation failed: {type(err).__name__}: {err}"))
            finally:
                with self.lock:
                    self.running = []

    def _run(self, jobs: list[Job]) -> None:
        first = jobs[0]
        sampling = first.sampling
        longest = max(len(job.prompt_ids) for job in jobs)
        ids = torch.full((len(jobs), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), longest), dtype=torch.long)
        for b, job in enumerate(jobs):
            n = len(job.prompt_ids)
            ids[b, longest - n :] = torch.tensor(job.prompt_ids)
            mask[b, longest - n :] = 1
        streamer = RowStreamer(jobs, self.tokenizer, self.eos)
        kwargs: dict[str, Any] = {
            "max_new_tokens": first.max_tokens,
            "do_sample": sampling.temperature > 0,
            "top_k": max(sampling.top_k, 0),
            "top_p": sampling.top_p,
            "pad_token_id": self.pad,
            "eos_token_id": self.eos,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([Cancelled(jobs)]),
            "return_dict_in_generate": True,
        }
        if sampling.temperature > 0:
            kwargs["temperature"] = sampling.temperature
        if first.backstep is not None:
            kwargs["backstep"] = first.backstep
            kwargs["tokenizer"] = self.tokenizer
        else:
            kwargs["backstep"] = False
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        events = getattr(out, "backstep_events", None)
        self.batches += 1
        self.rows += len(jobs)
        for b, job in enumerate(jobs):
            if job.cancelled.is_set():
                self.aborted += 1
                continue
            tokens, finish = final_tokens(out.sequences[b, longest:].tolist(), self.eos, job.max_tokens)
            text = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
            report = RewindReport.of(events[b]) if events is not None and first.backstep is not None else None
            rest = streamer.texts[b].rest(text)
            if streamer.texts[b].sent != text:
                self.stream_mismatches += 1
                log.error("request %d: the streamed text differs from the final text", job.id)
            if job.stream and rest:
                job.emit("delta", rest)
            job.emit("done", Result(text, len(tokens), finish, report))
