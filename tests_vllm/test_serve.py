"""The OpenAI-compatible server on the vLLM backend (AsyncLLM), through the real ``openai`` client and httpx,
against a server started here on a free loopback port (SmolLM2-135M-Instruct, CPU)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette", reason="the [serve] extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

MODEL = "smol"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The CPU engine settings of conftest's `llm` fixture (float32, eager, small KV cache, no chunked prefill).
ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,
    "block_size": 32,
    "max_model_len": 1024,
    "max_num_batched_tokens": 4096,
    "seed": 0,
}


@pytest.fixture(scope="module")
def backend(model_path):
    from perpetual_logits.serve.backends.vllm import VLLMBackend

    return VLLMBackend(model_path, MODEL, max_queue=64, engine_args=ENGINE)


@pytest.fixture(scope="module")
def url(backend):
    from perpetual_logits.serve import MethodDefaults, ServerSettings, create_app, running

    with running(create_app(backend, ServerSettings(MethodDefaults("chat"))), timeout=600) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_chat_completion_with_the_chat_preset(client):
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, temperature=0.7, seed=1)
    # the preset writes on past SmolLM2's own end; its landing may end it at a sentence in the last quarter
    assert 45 <= out.usage.completion_tokens <= 60 and out.choices[0].finish_reason in ("length", "stop")
    report = out.model_extra["backstep"]
    assert report["preset"] == "chat" and report["rewinds"] >= 1  # SmolLM2 answers in fewer tokens
    assert out.choices[0].message.content


def test_stream_equals_final_text(client):
    common = {"model": MODEL, "messages": QUESTION, "max_tokens": 60, "temperature": 0.7, "seed": 2}
    full = client.chat.completions.create(**common)
    pieces, report, usage = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **common):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                report = chunk.model_extra["backstep"]
    assert full.model_extra["backstep"]["rewinds"] >= 1
    assert "".join(pieces) == full.choices[0].message.content
    assert report == full.model_extra["backstep"] and usage.completion_tokens == full.usage.completion_tokens


def test_sixteen_clients_with_different_settings(client, backend):
    groups = {
        "plain": {"temperature": 0, "max_tokens": 200, "extra_body": {"preset": "none"}},
        "backstep": {"temperature": 0, "max_tokens": 48, "extra_body": {"preset": "backstep"}},
        "dynamic": {"temperature": 0.8, "max_tokens": 40, "extra_body": {"preset": "dynamic"}},
        "short": {"temperature": 0.8, "max_tokens": 5, "extra_body": {"backstep": {"n_remove": 3}}},
    }
    rows = backend.rows

    def ask(name: str):
        return name, client.chat.completions.create(model=MODEL, messages=QUESTION, **groups[name])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, [name for name in groups for _ in range(4)]))
    texts: dict[str, set[str]] = {}
    for name, out in results:
        report = out.model_extra["backstep"]
        texts.setdefault(name, set()).add(out.choices[0].message.content)
        if name == "plain":
            assert report is None and out.choices[0].finish_reason == "stop"
        else:
            assert report["preset"] == groups[name]["extra_body"].get("preset", "chat")
            if report["preset"] == "chat":  # its landing may cut a row back at the limit to a sentence or word
                assert 0 < out.usage.completion_tokens <= groups[name]["max_tokens"]
                assert out.choices[0].finish_reason == "length"
            else:
                assert out.usage.completion_tokens == groups[name]["max_tokens"]
    assert len(texts["plain"]) == 1 and len(texts["backstep"]) == 1  # greedy: one text per group
    assert backend.rows - rows == 16


def test_disconnect_aborts_the_request(url, backend):
    aborted = backend.aborted
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 800, "stream": True, "preset": "backstep"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    end = time.monotonic() + 60
    while backend.aborted == aborted or backend.tasks:
        assert time.monotonic() < end, "the request was not aborted"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4", "messages": QUESTION}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 1100}]}, 413, "messages"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 2000}, 400, "max_tokens"),
        ({"model": MODEL, "messages": QUESTION, "backstep": {"n_remove": 0}}, 400, "backstep.n_remove"),
    ],
)
def test_bad_input(url, body, status, param):
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status and response.json()["error"]["param"] == param
    assert httpx.get(f"{url}/health").status_code == 200
