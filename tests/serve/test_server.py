"""The OpenAI-compatible server on the HF backend, through the real ``openai`` client and httpx, against a server
started here on a free loopback port (TinyStories-656K)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the [serve] extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")

from support import TINYSTORIES, deadline, require_model_dir  # noqa: E402

from perpetual_logits.app.running import load_model  # noqa: E402
from perpetual_logits.cli import main  # noqa: E402
from perpetual_logits.serve import MethodDefaults, ServerSettings, create_app, running  # noqa: E402
from perpetual_logits.serve.backends.hf import HFBackend  # noqa: E402

MODEL = "tinystories"
TEMPLATE = "{% for m in messages %}{{ m.content }}{% if not loop.last %} {% endif %}{% endfor %}"
PROMPT = "Once upon a time"
pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(require_model_dir(TINYSTORIES)))


@pytest.fixture(scope="module")
def backend(loaded):
    return HFBackend(loaded, MODEL, max_batch=16, batch_wait=0.05, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def url(backend):
    with running(create_app(backend, ServerSettings(MethodDefaults("dynamic")))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _wait_for(condition, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


class _Gate:
    """Holds the model's forwards: none runs until :meth:`allow` or :meth:`open` lets it. Tests use it so that a request
    is still running, at a known step, when its client leaves, however fast the machine is."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.allowance = 0
        self.is_open = False
        self.held = 0  # forwards waiting at the gate now (0 or 1: one worker)

    def pass_through(self) -> None:
        with self.cond:
            self.held += 1
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.is_open or self.allowance > 0, timeout=60), "the gate never opened"
            if not self.is_open:
                self.allowance -= 1
            self.held -= 1

    def allow(self, forwards: int) -> None:
        with self.cond:
            self.allowance += forwards
            self.cond.notify_all()

    def wait_until_held(self) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.held > 0, timeout=60), "no forward came to the gate"

    def open(self) -> None:
        with self.cond:
            self.is_open = True
            self.cond.notify_all()


@contextlib.contextmanager
def _gated(model: Any) -> Iterator[_Gate]:
    """Route every forward of ``model`` through a closed :class:`_Gate`; the gate opens when the block ends."""
    gate = _Gate()
    forward = model.forward

    def gated_forward(*args: Any, **kwargs: Any) -> Any:
        gate.pass_through()
        return forward(*args, **kwargs)

    model.forward = gated_forward
    try:
        yield gate
    finally:
        gate.open()
        del model.forward


def _idle(backend: HFBackend, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while backend.running or backend.pending():
        assert time.monotonic() < end, "the backend did not go idle"
        time.sleep(0.02)


# -- the four routes ----------------------------------------------------------------------------------------------
def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_completion_returns_max_tokens_and_reports_rewinds(client):
    with deadline(60):
        out = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=220, seed=0, extra_body={"preset": "backstep"}
        )
    choice = out.choices[0]
    assert out.usage.completion_tokens == 220 and choice.finish_reason == "length"  # EOS never ends the story
    report = out.model_extra["backstep"]
    assert report["preset"] == "backstep"
    assert report["rewinds"] >= 1 and report["reasons"]["eos"] == report["rewinds"]  # TinyStories ends ~120 tokens
    assert report["removed_tokens"] >= 10 * report["rewinds"] - 10
    assert "<|end_story|>" not in choice.text and len(choice.text) > 400


def test_preset_none_is_plain_sampling(client):
    with deadline(60):
        out = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=400, temperature=0, extra_body={"preset": "none"}
        )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens < 400  # the story ends by itself
    assert out.model_extra["backstep"] is None


def test_chat_completion_applies_the_template(client, loaded):
    messages = [{"role": "system", "content": "Once upon"}, {"role": "user", "content": "a time"}]
    with deadline(60):
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    prompt_ids = loaded.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 30
    # greedy: the same text as the completion of the same prompt without BOS... compare through the server itself
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert again.choices[0].message.content == out.choices[0].message.content


# -- streaming ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_final_text_and_never_retracts(client, chat):
    """The stream of a seeded request equals the same request unstreamed, across rewinds; it arrives in pieces
    (tokens older than the hold-back), and usage / the rewind report come at the end."""
    extra = {"preset": "dynamic", "backstep": {"n_remove": 6}}
    common = {"model": MODEL, "max_tokens": 200, "seed": 3, "extra_body": extra}
    with deadline(120):
        if chat:
            messages = [{"role": "user", "content": PROMPT}]
            full = client.chat.completions.create(messages=messages, **common)
            stream = client.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True}, **common
            )
            final_text = full.choices[0].message.content
        else:
            full = client.completions.create(prompt=PROMPT, **common)
            stream = client.completions.create(
                prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **common
            )
            final_text = full.choices[0].text
        pieces, finish, usage, report = [], None, None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                piece = c.delta.content if chat else c.text
                if piece:
                    pieces.append(piece)
                if c.finish_reason is not None:
                    finish, report = c.finish_reason, chunk.model_extra["backstep"]
    assert full.model_extra["backstep"]["rewinds"] >= 1  # the stream had something to hold back
    assert "".join(pieces) == final_text
    assert len(pieces) > 5  # streamed as tokens became final, not in one piece at the end
    assert finish == "length" and usage.completion_tokens == 200 == full.usage.completion_tokens
    assert report == full.model_extra["backstep"]


def test_streams_batched_together_add_up_to_their_final_text(url, backend):
    """Eight streaming clients with equal settings share a generate(); each stream adds up to its row's final text
    (the backend compares them) and returns max_tokens tokens, rewinds included."""
    _idle(backend)
    batches, mismatches = backend.batches, backend.stream_mismatches
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 160, "stream": True, "preset": "backstep"}
    body["stream_options"] = {"include_usage": True}

    def stream(_: int) -> tuple[str, dict]:
        text, usage = "", {}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    text += "".join(c["text"] for c in chunk["choices"])
        return text, usage

    with deadline(120), ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, range(8)))
    assert backend.batches - batches < 8 and backend.stream_mismatches == mismatches
    assert all(usage["completion_tokens"] == 160 and len(text) > 300 for text, usage in results)
    assert len({text for text, _ in results}) > 1  # sampled rows of one batch differ


def test_incremental_text_releases_exactly_the_final_text(loaded):
    """Deltas of any chunking of any token list, plus the rest at the end, are the decoded text: never retracted."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from perpetual_logits.serve.backends.base import IncrementalText

    tok = loaded.tokenizer
    vocab = len(tok)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, vocab - 1), max_size=40), st.lists(st.integers(1, 5), min_size=1, max_size=40))
    def check(ids, cuts):
        text = IncrementalText(tok, skip=loaded.eos)
        released, i, k = "", 0, 0
        while i < len(ids):
            step = cuts[k % len(cuts)]
            released += text.add(ids[i : i + step])
            i, k = i + step, k + 1
        final = tok.decode([t for t in ids if t not in loaded.eos], skip_special_tokens=True)
        assert released + text.rest(final) == final

    check()


# -- concurrency ---------------------------------------------------------------------------------------------------
def test_sixteen_clients_with_different_settings(client, backend):
    """16 clients at once in four groups of settings: each response shows its own group's behaviour, and the
    groups' members were batched together."""
    groups = {
        "plain": {"temperature": 0, "max_tokens": 300, "extra_body": {"preset": "none"}},
        "backstep": {"temperature": 0, "max_tokens": 180, "extra_body": {"preset": "backstep"}},
        "ban": {
            "temperature": 0,
            "max_tokens": 60,
            "extra_body": {"preset": "backstep", "backstep": {"ban_phrases": [" tree"]}},
        },
        "short": {
            "temperature": 0.8,
            "max_tokens": 7,
            "extra_body": {"preset": "dynamic", "backstep": {"n_remove": 3}},
        },
    }
    jobs = [name for name in groups for _ in range(4)]
    batches_before, rows_before = backend.batches, backend.rows

    def ask(name: str):
        return name, client.completions.create(model=MODEL, prompt="One day, a little girl named", **groups[name])

    with deadline(180), ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, jobs))
    texts: dict[str, set[str]] = {}
    for name, out in results:
        choice, report = out.choices[0], out.model_extra["backstep"]
        texts.setdefault(name, set()).add(choice.text)
        if name == "plain":
            assert report is None and choice.finish_reason == "stop" and out.usage.completion_tokens < 300
        else:
            assert report["preset"] == groups[name]["extra_body"]["preset"]
            assert choice.finish_reason == "length"
            assert out.usage.completion_tokens == groups[name]["max_tokens"]
        if name == "backstep":
            assert report["reasons"].get("eos", 0) >= 1
        if name == "ban":
            assert " tree" not in choice.text and report["reasons"].get("phrase", 0) >= 1
    for name in ("plain", "backstep", "ban"):  # greedy, same prompt: one text per group
        assert len(texts[name]) == 1, name
    assert backend.rows - rows_before == 16
    assert backend.batches - batches_before < 16  # requests with equal settings shared a generate()


# -- disconnects ---------------------------------------------------------------------------------------------------
def test_disconnect_aborts_streaming_and_waiting_requests(url, backend, loaded):
    """A client that leaves while its request runs, streaming or not, ends that request at the next step. The model's
    forwards pass a gate one at a time, so the request is mid-way whatever the machine's speed."""
    _idle(backend)
    aborted = backend.aborted
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 480, "preset": "backstep", "stream": True}

    def running_job_was_cancelled() -> bool:
        jobs = list(backend.running)
        return bool(jobs) and all(job.cancelled.is_set() for job in jobs)

    with deadline(60):
        with _gated(loaded.model) as gate, ThreadPoolExecutor(1) as pool:

            def first_line() -> str:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                    assert response.status_code == 200
                    return next(response.iter_lines())  # then the client leaves

            reader = pool.submit(first_line)
            while not reader.done():  # one forward at a time until the first text has reached the client
                gate.wait_until_held()
                gate.allow(1)
                time.sleep(0.01)
            assert reader.result().startswith("data: ")
            _wait_for(running_job_was_cancelled)
        _idle(backend)
        assert backend.aborted == aborted + 1
        # a non-streaming client that gives up (read timeout) closes its connection too
        with _gated(loaded.model) as gate, ThreadPoolExecutor(1) as pool:
            gone = pool.submit(httpx.post, f"{url}/v1/completions", json={**body, "stream": False}, timeout=2)
            gate.wait_until_held()
            with pytest.raises(httpx.ReadTimeout):
                gone.result()
            _wait_for(running_job_was_cancelled)
        _idle(backend)
    assert backend.aborted == aborted + 2  # both rows were finished early, not run to 480 tokens
    out = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}, timeout=30)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


# -- bad input -----------------------------------------------------------------------------------------------------
BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("completions", b"\xff\xfe{}", 400, None),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "a", "temprature": 1}, 400, "temprature"),
    ("completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "a", "seed": -1}, 400, "seed"),
    ("completions", {"model": MODEL, "prompt": "a", "n": 2}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": MODEL, "prompt": "a", "preset": "fast"}, 400, "preset"),
    ("completions", {"model": MODEL, "prompt": "a", "backstep": {"n_remove": 0}}, 400, "backstep.n_remove"),
    ("completions", {"model": MODEL, "prompt": "a", "backstep": {"nremove": 3}}, 400, "backstep.nremove"),
    ("completions", {"model": MODEL, "prompt": "a", "backstep": {"hold_back": 2}}, 400, "backstep.hold_back"),
    ("completions", {"model": MODEL, "prompt": "a", "backstep": {"schedule": "hot"}}, 400, "backstep.schedule"),
    ("completions", {"model": MODEL, "prompt": "a", "backstep": {"end_phrases": [""]}}, 400, "backstep.end_phrases[0]"),
    ("completions", {"model": MODEL, "prompt": "a", "preset": "none", "backstep": {}}, 400, "backstep"),
    ("completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": "word " * 600}, 413, "prompt"),
    ("completions", b'{"model": "' + b"x" * (5 * 1024 * 1024) + b'"}', 413, None),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "a"}]}, 400, "messages[0].role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 600}]}, 413, "messages"),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 9999},
        400,
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_a_clear_error(url, route, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with deadline(30):
        response = httpx.post(f"{url}/v1/{route}", content=content, timeout=20)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_wrong_route_and_method(url):
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["message"] == "no route /v1/nothing"
    response = httpx.get(f"{url}/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"backstep\.n_remove"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body={"backstep": {"n_remove": -3}})


# -- queue limit and API key ---------------------------------------------------------------------------------------
def test_full_queue_is_429_and_api_key_is_required(loaded):
    backend = HFBackend(loaded, MODEL, max_batch=1, max_queue=1, batch_wait=0.0)
    settings = ServerSettings(MethodDefaults("backstep"), api_key="sekret")
    with deadline(120), running(create_app(backend, settings)) as base:
        headers = {"Authorization": "Bearer sekret"}
        assert httpx.get(f"{base}/health").status_code == 200  # open
        denied = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/v1/models").status_code == 401

        def long(i: int) -> httpx.Response:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "seed": i}
            return httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)

        with _gated(loaded.model) as gate, ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(long, i) for i in range(3)]
            done, _ = wait(futures, timeout=60, return_when=FIRST_COMPLETED)
            assert [f.result().status_code for f in done] == [429]  # refused while the other two run and wait
            gate.open()
            statuses = sorted(f.result().status_code for f in futures)
        assert statuses == [200, 200, 429]  # one runs, one waits, one is refused
        refused = next(f.result() for f in futures if f.result().status_code == 429)
        assert refused.json()["error"]["code"] == "queue_full"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2

        # A waiting request whose client leaves frees its queue slot and never runs. The running request is held
        # at its forwards, so on a fast machine it cannot finish before the disconnect is seen.
        _idle(backend)
        rows = backend.rows
        with _gated(loaded.model) as gate, ThreadPoolExecutor(1) as pool:
            running_one = pool.submit(long, 7)
            gate.wait_until_held()
            body = {"model": MODEL, "prompt": PROMPT}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=0.5)
            _wait_for(lambda: backend.pending() == 0)
            assert not running_one.done()  # the slot was freed at the disconnect, not when its turn came
            gate.open()
            assert running_one.result().status_code == 200
        _idle(backend)
        assert backend.rows == rows + 1


# -- the command line ----------------------------------------------------------------------------------------------
def test_cli_serve_refuses_bad_options(capsys):
    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--model", str(TINYSTORIES), "--backstep", '{"n_remove": "x"}']) == 2
    assert "n_remove" in capsys.readouterr().err
    assert main(["serve", "--model", str(TINYSTORIES), "--port", "70000"]) == 2


# -- the loop's row streaming, which the server's batched streams rest on ----------------------------------------
def test_backstep_streams_each_row_of_a_batch_to_a_row_streamer(loaded):
    """A streamer with ``put_row`` receives, per row, exactly the row's returned tokens, in order, each once, with
    rewinds happening (batch size > 1 used to be refused)."""
    import torch

    import perpetual_logits as pl

    class Recorder:
        def __init__(self, rows: int) -> None:
            self.rows: list[list[int]] = [[] for _ in range(rows)]

        def put_row(self, row: int, tokens) -> None:
            self.rows[row] += tokens.tolist()

        def put(self, value) -> None:  # generate() hands over the prompt first, as to any streamer
            assert value.dim() == 2 and value.shape[0] == 3, "a row streamer gets generated tokens via put_row only"

        def end(self) -> None:
            pass

    model, tok = pl.make_perpetual(loaded.model), loaded.tokenizer
    tok.padding_side = "left"
    batch = tok(["Once upon a time", "Tom had a big red ball.", "One day"], return_tensors="pt", padding=True)
    recorder = Recorder(3)
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        do_sample=True,
        max_new_tokens=200,
        streamer=recorder,
        backstep=pl.BackstepConfig(n_remove=8),
        return_dict_in_generate=True,
    )
    assert sum(len(events) for events in out.backstep_events) >= 3  # rows rewound while streaming
    prompt = batch.input_ids.shape[1]
    for row in range(3):
        assert recorder.rows[row] == out.sequences[row, prompt:].tolist()


# -- method settings: preset, server defaults, request fields --------------------------------------------------------
def test_request_settings_override_server_defaults_over_the_preset():
    from perpetual_logits import LoopDetection
    from perpetual_logits.schedules import LinearDecay
    from perpetual_logits.serve.errors import APIError
    from perpetual_logits.serve.methods import resolve_backstep
    from perpetual_logits.serve.schemas import BackstepSettings

    server = MethodDefaults("chat", BackstepSettings(n_remove=6, peak=1.2))
    name, config = resolve_backstep(server, None, None)  # the server's fields over its preset
    assert name == "chat" and config.n_remove == 6 and config.schedule == LinearDecay(1.2, 6)
    assert config.end_phrases == "chat" and config.loops == LoopDetection()  # the chat preset's loop settings
    name, config = resolve_backstep(server, None, BackstepSettings(n_remove=4, schedule="none"))
    assert (config.n_remove, config.schedule, config.end_phrases) == (4, None, "chat")
    name, config = resolve_backstep(server, "backstep", None)  # a named preset starts from the preset alone
    assert (name, config.n_remove, config.schedule, config.end_phrases) == ("backstep", 10, None, None)
    assert resolve_backstep(server, "none", None) == ("none", None)
    with pytest.raises(APIError, match="preset other than 'none'"):
        resolve_backstep(MethodDefaults("none"), None, BackstepSettings(n_remove=3))
    with pytest.raises(ValueError, match="hold_back"):
        MethodDefaults("dynamic", BackstepSettings(hold_back=3))  # a bad server default fails at start-up
