"""Backstep served by vLLM vs backstep in HF ``generate()`` vs plain vLLM, on SmolLM2-135M-Instruct.

Run in ``.venv-vllm`` (``make bench-vllm``). The HF arm runs in a separate process with ``--hf-python`` (the
main ``.venv``: vLLM pins an older transformers). Writes ``benchmarks/results/vllm.md`` and ``vllm.json``.

Arms, per prompt count (8 and 64 chat prompts, ``--max-tokens`` final tokens each, temperature 1.0):

* ``vllm plain``: ``llm.generate`` -- answers end at EOS, so fewer tokens;
* ``vllm plain, ignore_eos``: every request writes ``max_tokens`` (the work the backstep arm must at least do);
* ``vllm backstep``: :func:`perpetual_logits.vllm.generate` with ``BackstepConfig.method4(n_remove)``;
* ``hf backstep``: ``make_perpetual(model).generate(..., backstep=BackstepConfig.method4(n_remove))`` on one
  left-padded batch of all prompts;
* with ``--chat-arms``: ``vllm chat preset`` (``BackstepConfig.chat(n_remove)``: endings, loops) and ``vllm chat
  preset, no phrases/loops`` (the same without ``end_phrases`` and ``loops``); the report gives their
  throughput ratio (issue 21's goal: >= 0.9), with ``--chat-repeats N`` the median of N paired runs in
  alternating order (a single pair always runs the two arms in the same order).

Every backstep arm also reports its throughput against the forward-count ideal: plain ``ignore_eos``
tokens/s x final tokens / sampled tokens (what the run would take if a sampled-then-removed token cost what a
plain one does and a rewind cost nothing else).

Throughput is final tokens per second of wall time (engine start-up excluded). For the vLLM backstep arm it
also reports the share of resubmitted prompt tokens served from the prefix cache and the recomputed tokens
per rewind: prompt tokens prefilled again (not cached) plus tokens sampled and then removed (EOS included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make perpetual_logits importable
    sys.path.insert(0, str(REPO))

QUESTIONS = [
    "What is the capital of France?",
    "Is water wet? Answer briefly.",
    "Give me a synonym for happy.",
    "How many legs does a dog have?",
    "Tell me a short story about a fox.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
    "What do bees make?",
]


CONTEXT = (
    "The village sat between two hills, and every morning the baker opened her shop before the sun rose. "
    "Children walked past on their way to school, and the old clockmaker waved from his window. "
)


def chat_prompts(tokenizer: Any, count: int, context_repeats: int = 0) -> list[list[int]]:
    """``count`` chat prompts as token ids (the questions repeat with a numbered variation), each after
    ``context_repeats`` copies of a short passage (a long shared context, as in a chat with history)."""
    out = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (variant {i // len(QUESTIONS)})")
        question = CONTEXT * context_repeats + question
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        out.append(list(tokenizer.encode(text)))
    return out


def run_hf(model_path: str, prompts: list[list[int]], max_tokens: int, n_remove: int, seed: int) -> dict[str, Any]:
    """The HF arm (main venv): one batch, left-padded, Method 4."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import perpetual_logits as pl

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = pl.make_perpetual(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.eos_token_id
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            temperature=1.0,
            max_new_tokens=max_tokens,
            pad_token_id=pad,
            backstep=pl.BackstepConfig.method4(n_remove),
            return_dict_in_generate=True,
        )
    wall = time.perf_counter() - start
    final = int((out.sequences[:, longest:] != pad).sum())
    events = sum(len(e) for e in out.backstep_events)
    return {"wall_s": wall, "final_tokens": final, "rewinds": events, "torch_threads": torch.get_num_threads()}


def backstep_row(
    arm: str, outs: list[Any], wall: float, count: int, block_size: int, ideal_tps: float, **extra: Any
) -> dict[str, Any]:
    """A row for one backstep run: throughput, rewinds, prefix-cache use, and the ratio to the forward-count
    ideal (``ideal_tps``: plain ignore_eos tokens/s; scaled here by final / sampled tokens)."""
    final = sum(len(o.token_ids) for o in outs)
    rewinds = sum(len(o.backstep_events) for o in outs)
    resubmitted = sum(o.stats.resubmitted_prompt_tokens for o in outs)
    cached = sum(o.stats.cached_prompt_tokens for o in outs)
    sampled = sum(o.stats.sampled_tokens for o in outs)
    ideal = ideal_tps * final / sampled if sampled else None
    return _row(
        arm,
        count,
        wall,
        final,
        block_size,
        rewinds=rewinds,
        resubmitted_prompt_tokens=resubmitted,
        cached_prompt_tokens=cached,
        cache_share=cached / resubmitted if resubmitted else None,
        recomputed_prefill_per_rewind=(resubmitted - cached) / rewinds if rewinds else None,
        resampled_per_rewind=(sampled - final) / rewinds if rewinds else None,
        sampled_tokens=sampled,
        ratio_to_forward_count_ideal=(final / wall) / ideal if ideal else None,
        **extra,
    )


def run_vllm_arms(
    model_path: str,
    counts: list[int],
    max_tokens: int,
    n_remove: int,
    block_size: int,
    seed: int,
    context: int = 0,
    chat_arms: bool = False,
    chat_repeats: int = 1,
) -> tuple[list[dict[str, Any]], dict[int, list[list[int]]]]:
    from vllm import SamplingParams

    import perpetual_logits as pl
    import perpetual_logits.vllm as plv

    llm = plv.LLM(
        model_path,
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        block_size=block_size,
        max_model_len=2048,
        max_num_batched_tokens=16384,
        max_num_seqs=64,
        seed=seed,
    )
    tokenizer = llm.get_tokenizer()
    rows: list[dict[str, Any]] = []
    all_prompts: dict[int, list[list[int]]] = {}
    eos = set(plv.eos_token_ids(llm))
    # Warm-up (first-call costs are not the method's).
    llm.generate([{"prompt_token_ids": chat_prompts(tokenizer, 1)[0]}], SamplingParams(max_tokens=8), use_tqdm=False)
    warm = pl.BackstepConfig.chat(n_remove)  # the driver's and the processor's first-call costs too
    plv.generate(llm, chat_prompts(tokenizer, 1), SamplingParams(max_tokens=8), backstep=warm)
    for count in counts:
        prompts = chat_prompts(tokenizer, count, context)
        all_prompts[count] = prompts
        each = [SamplingParams(temperature=1.0, top_k=0, max_tokens=max_tokens, seed=seed + i) for i in range(count)]
        inputs: list[Any] = [{"prompt_token_ids": p} for p in prompts]
        llm.reset_prefix_cache()
        t = time.perf_counter()
        plain = llm.generate(inputs, each, use_tqdm=False)
        wall = time.perf_counter() - t
        tokens = sum(len(o.outputs[0].token_ids) for o in plain)
        ended = sum(o.outputs[0].token_ids[-1] in eos for o in plain)
        rows.append(_row("vllm plain", count, wall, tokens, block_size, ended_at_eos=ended))

        ignore = [
            SamplingParams(temperature=1.0, top_k=0, max_tokens=max_tokens, seed=seed + i, ignore_eos=True)
            for i in range(count)
        ]
        llm.reset_prefix_cache()
        t = time.perf_counter()
        forced = llm.generate(inputs, ignore, use_tqdm=False)
        wall = time.perf_counter() - t
        forced_tokens = sum(len(o.outputs[0].token_ids) for o in forced)
        rows.append(_row("vllm plain, ignore_eos", count, wall, forced_tokens, block_size))
        ideal_tps = forced_tokens / wall

        chat_config = pl.BackstepConfig.chat(n_remove)
        bare_config = pl.BackstepConfig.chat(n_remove, end_phrases=None, loops=None)
        arms = [("vllm backstep", pl.BackstepConfig.method4(n_remove))]
        if chat_arms:
            arms += [("vllm chat preset", chat_config), ("vllm chat preset, no phrases/loops", bare_config)]
        for arm, config in arms:
            llm.reset_prefix_cache()
            t = time.perf_counter()
            outs = plv.generate(llm, prompts, each, backstep=config)
            wall = time.perf_counter() - t
            rows.append(
                backstep_row(
                    arm,
                    outs,
                    wall,
                    count,
                    block_size,
                    ideal_tps,
                    reached_max_tokens=sum(len(o.token_ids) == max_tokens for o in outs),
                    mean_prompt_tokens=round(sum(len(p) for p in prompts) / count, 1),
                )
            )
        if chat_arms:
            chat, bare = rows[-2], rows[-1]
            # Paired ratios; each further repeat runs the pair again, in alternating order (the arm that runs
            # first is not favoured), and the median is reported.
            ratios = [chat["tokens_per_s"] / bare["tokens_per_s"]]
            for repeat in range(1, chat_repeats):
                pair = [("chat", chat_config), ("bare", bare_config)]
                speed: dict[str, float] = {}
                for name, config in pair[::-1] if repeat % 2 else pair:
                    llm.reset_prefix_cache()
                    t = time.perf_counter()
                    outs = plv.generate(llm, prompts, each, backstep=config)
                    speed[name] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
                ratios.append(speed["chat"] / speed["bare"])
            chat["throughput_ratio_to_no_phrases_loops"] = statistics.median(ratios)
            chat["throughput_ratios_paired"] = [round(r, 3) for r in ratios]
    llm.llm_engine.engine_core.shutdown()
    return rows, all_prompts


def _row(arm: str, count: int, wall: float, tokens: int, block_size: int | None, **extra: Any) -> dict[str, Any]:
    return {
        "arm": arm,
        "prompts": count,
        "block_size": block_size,
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        **extra,
    }


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (converted from GGUF Q4_1, float32)",
        "max_tokens": args.max_tokens,
        "context_repeats": args.context,
        "n_remove": args.n_remove,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, no GPU",
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    (out / "vllm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "## Serving: backstep on vLLM",
        "",
        f"SmolLM2-135M-Instruct, chat prompts, {args.max_tokens} final tokens per prompt, temperature 1.0, "
        f"`BackstepConfig.method4({args.n_remove})`; {meta['machine']}; vLLM {meta.get('vllm', '?')} (CPU build, "
        "V1 model runner, eager, float32). Wall time excludes engine start-up; one run per arm."
        + (f" Each prompt starts with {args.context} copies of a ~40-token passage." if args.context else ""),
        "",
        "| arm | prompts | block size | tokens | wall s | tokens/s | rewinds | prefix-cache share | "
        "recomputed prefill / rewind | resampled / rewind | vs forward-count ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    chat_ratios: list[str] = []
    for r in rows:

        def fmt(key: str, digits: int = 1, row: dict[str, Any] = r) -> str:
            value = row.get(key)
            if value is None:
                return "–"
            return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

        share = r.get("cache_share")
        lines.append(
            f"| {r['arm']} | {r['prompts']} | {r['block_size'] or '–'} | {r['tokens']} | {r['wall_s']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {fmt('rewinds')} | {'–' if share is None else f'{100 * share:.1f} %'} | "
            f"{fmt('recomputed_prefill_per_rewind')} | {fmt('resampled_per_rewind')} | "
            f"{fmt('ratio_to_forward_count_ideal', 2)} |"
        )
        if r.get("throughput_ratio_to_no_phrases_loops") is not None:
            paired = r.get("throughput_ratios_paired", [])
            spread = f" (median of {len(paired)}: {min(paired):.2f}-{max(paired):.2f})" if len(paired) > 1 else ""
            chat_ratios.append(f"{r['prompts']} prompts: {r['throughput_ratio_to_no_phrases_loops']:.2f}{spread}")
    lines += [
        "",
        "Prefix-cache share: prompt tokens of resubmitted requests (prompt + kept tokens) that vLLM served from its "
        "prefix cache. Recomputed prefill / rewind: the rest, per rewind (vLLM caches whole blocks only, so up to "
        "one block per rewind). Resampled / rewind: tokens sampled and then removed (removed tokens plus the EOS). "
        "Vs forward-count ideal: tokens/s over plain ignore_eos tokens/s x final / sampled tokens.",
        "",
        *(
            [f"Chat preset throughput / the same without phrases and loops: {'; '.join(chat_ratios)}.", ""]
            if chat_ratios
            else []
        ),
        f"Command: `{meta['command']}`",
        "",
    ]
    (out / "vllm.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PERPETUAL_LOGITS_VLLM_MODEL"), help="converted folder")
    parser.add_argument("--counts", default="8,64", help="prompt counts, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-remove", type=int, default=10)
    parser.add_argument("--block-sizes", default="32,128", help="vLLM KV block sizes to run (multiples of 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=int, default=0, help="copies of a ~40-token passage before each question")
    parser.add_argument("--chat-arms", action="store_true", help="add the chat-preset arms (with/without phrases)")
    parser.add_argument(
        "--chat-repeats", type=int, default=1, help="runs of the chat pair, alternating their order (median ratio)"
    )
    parser.add_argument("--hf-python", default=None, help="python of the main venv for the HF arm (skip if unset)")
    parser.add_argument("--hf-counts", default="8,64", help="prompt counts of the HF arm")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or PERPETUAL_LOGITS_VLLM_MODEL) is required: the converted SmolLM2 folder")
    if args.hf_worker:
        prompts = json.loads(Path(args.prompts_json).read_text())
        print(json.dumps(run_hf(args.model, prompts, args.max_tokens, args.n_remove, args.seed)))
        return
    counts = [int(c) for c in args.counts.split(",")]
    if args.hf_python and not {int(c) for c in args.hf_counts.split(",")} <= set(counts):
        # The HF arm runs the vLLM arms' prompts: checked before the vLLM arms take minutes.
        parser.error(f"--hf-counts ({args.hf_counts}) must be among --counts ({args.counts}) when --hf-python is given")
    rows: list[dict[str, Any]] = []
    prompts_by_count: dict[int, list[list[int]]] = {}
    for block_size in [int(b) for b in args.block_sizes.split(",")]:
        got, prompts_by_count = run_vllm_arms(
            args.model,
            counts,
            args.max_tokens,
            args.n_remove,
            block_size,
            args.seed,
            args.context,
            args.chat_arms,
            args.chat_repeats,
        )
        rows += got if not rows else [r for r in got if not r["arm"].startswith("vllm plain")]
        print(json.dumps(got), flush=True)
        write_report(rows, args, Path(args.out))  # partial results survive a stopped run
    if args.hf_python:
        for count in [int(c) for c in args.hf_counts.split(",")]:
            prompts_file = Path(args.out) / f".prompts-{count}.json"
            prompts_file.parent.mkdir(parents=True, exist_ok=True)
            prompts_file.write_text(json.dumps(prompts_by_count[count]))
            command = [args.hf_python, __file__, "--hf-worker", "--model", args.model, "--prompts-json"]
            command += [str(prompts_file), "--max-tokens", str(args.max_tokens), "--n-remove", str(args.n_remove)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            prompts_file.unlink()
            hf = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(
                _row("hf backstep", count, hf["wall_s"], hf["final_tokens"], None, rewinds=hf["rewinds"])
                | {"torch_threads": hf["torch_threads"]}
            )
            print(json.dumps(rows[-1]), flush=True)
            write_report(rows, args, Path(args.out))


if __name__ == "__main__":
    main()
