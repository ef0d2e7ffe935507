"""Context-shift benchmark (issue 17): writing far past the model's window with a bounded cache.

Run ``python benchmarks/context_shift.py`` (TinyStories-656K, 5,000 new tokens, 8 prompts x 2 seeds, arms
``reprefill``, ``rerotate`` and ``none``, then the same at batch 8; about an hour on 2 cores), ``--smoke`` for a
seconds-long check, ``--smollm2`` to add the SmolLM2-135M-Instruct arm (window forced to 1,024, a chat story
prompt, 3,000 tokens). Results: ``<out>/context_shift.json``, ``<out>/context_shift.md`` and
``<out>/context_shift.png``.

Design. Every run is Method 4 + endings (``BackstepConfig.method4(10, end_phrases="default")``) sampling at
T 1.0, top-k 50, with ``torch.manual_seed(seed)`` before it; the arms differ only in ``window``:
``ContextShift(method="reprefill")``, ``ContextShift(method="rerotate")`` or none (positions run past the
model's 512, as before issue 17). The whole text of a run is scored once by the judge (stories260K, its own
tokenizer, bits per character, strided over its 512-token window) and the score is split into windows of
``--judge-window`` generated tokens (250): the in-window reference is tokens 250-500 (the last in-window
window of the same runs), the *later* windows are those starting at or after the row's first shift (when the
row first holds ``limit + 1`` text tokens), aligned there. Goals (issue 17): pooled bits/char of the later
windows <= 1.10x the reference (95 % bootstrap interval over runs); worst later window (pooled over runs)
<= 1.20x the worst in-window window; peak cache length <= the window; time per token of the last 1,000 tokens
<= 1.10x the first 1,000 (timed while the longest row goes from ``a`` to ``b`` tokens, so rewinds and shifts
count); the same at batch 8 (the 8 prompts left-padded in one batch per seed).

Timings on a shared machine are not evidence: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from perpetual_logits import BackstepConfig, ContextShift, make_perpetual

PROMPTS = (
    "Once upon a time",
    "One day, a little girl named Lily",
    "Tom had a big red ball",
    "The sun was shining and the birds were singing",
    "There was a small dog who",
    "Sam and his mom went to the park",
    "In a big forest, there lived an old owl",
    "Anna found a shiny key under her bed",
)
ARMS = ("reprefill", "rerotate", "none")
CHAT_STORY = "Write a very long story about a young dragon who wants to become a baker. Use many chapters."
BOOTSTRAP = 2000
LN2 = math.log(2.0)


@dataclass
class Settings:
    new_tokens: int = 5000
    prompts: int = 8
    seeds: int = 2
    arms: tuple[str, ...] = ARMS
    batch: bool = True
    judge_window: int = 250
    limit: int | None = None  # None: the model's window (512)
    time_span: int = 1000
    smollm2: bool = False
    smollm2_tokens: int = 3000
    smollm2_limit: int = 1024
    smollm2_seeds: int = 1

    @classmethod
    def smoke(cls) -> Settings:
        return cls(
            new_tokens=320,
            prompts=2,
            seeds=1,
            judge_window=40,
            limit=96,
            time_span=60,
            smollm2_tokens=200,
            smollm2_limit=128,
        )


@dataclass
class Run:
    arm: str
    prompt: int
    seed: int
    batch: int
    prompt_tokens: int
    ids: list[int]
    stats: dict[str, Any]
    trace: list[tuple[float, int]] = field(default_factory=list)  # (seconds, longest row length) per step


class Clock:
    """A logits processor that only records when each step ran and how long the longest row was."""

    def __init__(self) -> None:
        self.trace: list[tuple[float, int]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.trace.append((time.perf_counter(), int(input_ids.shape[-1])))
        return scores


def backstep(arm: str, limit: int | None, chat: bool = False) -> BackstepConfig:
    window = None if arm == "none" else ContextShift(method=arm, limit=limit)  # type: ignore[arg-type]
    if chat:
        return BackstepConfig.chat(window=window)
    return BackstepConfig.method4(10, end_phrases="default", window=window)


def generate(model: Any, tokenizer: Any, texts: list[str], arm: str, seed: int, s: Settings) -> list[Run]:
    """One call: ``texts`` as one left-padded batch; returns one :class:`Run` per row."""
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    clock = Clock()
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=1.0,
        top_k=50,
        max_new_tokens=s.new_tokens,
        pad_token_id=0,
        backstep=backstep(arm, s.limit),
        tokenizer=tokenizer,
        logits_processor=[clock],
        return_dict_in_generate=True,
    )
    width = enc.input_ids.shape[1]
    runs = []
    for b in range(len(texts)):
        text_start = int((enc.attention_mask[b] == 0).sum())
        runs.append(
            Run(
                arm,
                b,
                seed,
                len(texts),
                width - text_start,
                out.sequences[b, text_start:].tolist(),
                asdict(out.backstep_stats),
                clock.trace,
            )
        )
    return runs


# -- scoring -------------------------------------------------------------------------------------------------
def window_scores(judge: Any, tokenizer: Any, run: Run, size: int) -> list[tuple[int, float, int]]:
    """(first generated token, NLL nats, chars) of each ``size``-token window of the run's generated text, scored
    by the judge over the whole text once (each judge token belongs to the window where its first char is)."""
    ids = run.ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    judge_ids, offsets = judge.tokenizer.encode_with_offsets(text)
    nll = judge.token_nll(judge_ids).tolist()
    starts = list(range(0, len(ids) - run.prompt_tokens - size + 1, size))
    if not starts:
        return []
    bounds = [len(tokenizer.decode(ids[: run.prompt_tokens + g], skip_special_tokens=True)) for g in starts]
    bounds.append(len(tokenizer.decode(ids[: run.prompt_tokens + starts[-1] + size], skip_special_tokens=True)))
    out = []
    for k, g in enumerate(starts):
        lo, hi = bounds[k], bounds[k + 1]
        total = sum(n for n, off in zip(nll, offsets[1:]) if lo <= off < hi)
        out.append((g, total, hi - lo))
    return out


def later_windows(judge: Any, tokenizer: Any, run: Run, size: int, first_shift: int) -> list[tuple[int, float, int]]:
    """Windows aligned at the first shift (generated token ``first_shift``), as far as the run goes."""
    shifted = Run(run.arm, run.prompt, run.seed, run.batch, run.prompt_tokens + first_shift, run.ids, run.stats)
    return [(g + first_shift, n, c) for g, n, c in window_scores(judge, tokenizer, shifted, size)]


def bpc(parts: Sequence[tuple[float, int]]) -> float | None:
    chars = sum(c for _, c in parts)
    return sum(n for n, _ in parts) / chars / LN2 if chars else None


def ratio_interval(num: list[list[tuple[float, int]]], den: list[list[tuple[float, int]]]) -> dict[str, Any]:
    """bpc(num) / bpc(den) pooled over runs, with a 95 % bootstrap interval resampling runs (paired)."""
    n = len(num)

    def ratio(sample: list[int]) -> float:
        a = bpc([p for i in sample for p in num[i]])
        b = bpc([p for i in sample for p in den[i]])
        return a / b if a is not None and b else float("nan")

    rng = random.Random(0)
    values = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(BOOTSTRAP)) if n > 1 else []
    ci = [common.percentile(values, 2.5), common.percentile(values, 97.5)] if values else None
    return {"ratio": ratio(list(range(n))), "ci95": ci, "runs": n}


def per_token_time(trace: list[tuple[float, int]], start: int, stop: int) -> float | None:
    """Seconds per token while the longest row first grew from ``start`` to ``stop`` tokens."""
    t0 = next((t for t, n in trace if n >= start), None)
    t1 = next((t for t, n in trace if n >= stop), None)
    if t0 is None or t1 is None or stop <= start:
        return None
    return (t1 - t0) / (stop - start)


def evaluate(runs: list[Run], judge: Any, tokenizer: Any, s: Settings, limit: int) -> dict[str, Any]:
    size = s.judge_window
    Parts = list[tuple[float, int]]  # (NLL nats, chars) pieces, pooled into bits/char
    ref: list[Parts] = []
    later: list[Parts] = []
    in_window_by_k: dict[int, Parts] = {}
    later_by_k: dict[int, Parts] = {}
    curve: dict[int, Parts] = {}
    for run in runs:
        first_shift = limit + 1 - run.prompt_tokens  # generated tokens when the row first holds limit + 1
        windows = window_scores(judge, tokenizer, run, size)
        for g, n, c in windows:
            curve.setdefault(g, []).append((n, c))
            if g + size <= first_shift:
                in_window_by_k.setdefault(g, []).append((n, c))
        ref.append([(n, c) for g, n, c in windows if g == size])
        shifted = later_windows(judge, tokenizer, run, size, first_shift) if first_shift > 0 else []
        later.append([(n, c) for _, n, c in shifted])
        for g, n, c in shifted:
            later_by_k.setdefault(g - first_shift, []).append((n, c))
    worst_in = max((bpc(v) or 0.0 for v in in_window_by_k.values()), default=None)
    worst_later = max((bpc(v) or 0.0 for v in later_by_k.values()), default=None)
    first_tokens = min(s.time_span, s.new_tokens // 2)
    times = []
    for run in runs:
        if run.trace and (run.batch == 1 or run.prompt == 0):  # one trace per call
            p = run.trace[0][1]  # the longest row's length at the first step: its prompt (with padding)
            end = p + s.new_tokens - 1  # its length at the last step
            times.append(
                (per_token_time(run.trace, p, p + first_tokens), per_token_time(run.trace, end - first_tokens, end))
            )
    first = [a for a, b in times if a is not None and b is not None]
    last = [b for a, b in times if a is not None and b is not None]
    time_ratio = (sum(last) / sum(first)) if first and sum(first) > 0 else None
    quality = ratio_interval(later, ref)
    peak = max(r.stats["peak_cache_slots"] for r in runs)
    pad = max(max(r.prompt_tokens for r in runs) - min(r.prompt_tokens for r in runs), 0)
    return {
        "runs": len(runs),
        "reference_bpc (tokens 250-500)": bpc([p for r in ref for p in r]),
        "later_bpc (after the first shift)": bpc([p for r in later for p in r]),
        "later_vs_reference": quality,
        "worst_in_window_bpc": worst_in,
        "worst_later_bpc": worst_later,
        "worst_ratio": worst_later / worst_in if worst_in and worst_later is not None else None,
        "peak_cache_slots": peak,
        "left_padding": pad if runs[0].batch > 1 else 0,
        "context_shifts": sum(r.stats["context_shifts"] for r in runs),
        "backsteps": sum(r.stats["rewinds"] for r in runs),
        "seconds_per_token_first": sum(first) / len(first) if first else None,
        "seconds_per_token_last": sum(last) / len(last) if last else None,
        "time_ratio_last_vs_first": time_ratio,
        "curve": {g: bpc(v) for g, v in sorted(curve.items())},
    }


def goals(result: dict[str, Any], limit: int) -> dict[str, Any]:
    q = result["later_vs_reference"]
    return {
        "later <= 1.10x reference": q["ratio"] <= 1.10 if q["ratio"] == q["ratio"] else None,
        "worst later <= 1.20x worst in-window": (result["worst_ratio"] or math.inf) <= 1.20,
        "peak cache <= window (+ left padding + 1)": result["peak_cache_slots"] <= limit + result["left_padding"] + 1,
        "last 1,000 tokens <= 1.10x first 1,000 (time)": (result["time_ratio_last_vs_first"] or math.inf) <= 1.10,
    }


# -- SmolLM2 --------------------------------------------------------------------------------------------------
def smollm2_arm(s: Settings) -> dict[str, Any]:
    """SmolLM2-135M-Instruct, its window forced to ``smollm2_limit``, the chat preset + the shift keeping the
    whole chat prompt (system turn and instruction). Judge: the model itself (T 1) over each window, with the
    ``judge_window`` tokens before it as context (positions stay far inside its own 8,192)."""
    from perpetual_logits.app.chat_model import load_chat_model

    common.quiet_transformers()
    model, tokenizer = load_chat_model(common.models_dir() / "smollm2-135m-instruct")
    model = make_perpetual(model)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_STORY}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    size, limit = s.judge_window, s.smollm2_limit
    rows = []
    for seed in range(s.smollm2_seeds):
        torch.manual_seed(seed)
        config = BackstepConfig.chat(window=ContextShift(limit=limit))
        start = time.perf_counter()
        out = model.generate(
            prompt,
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            max_new_tokens=s.smollm2_tokens,
            backstep=config,
            tokenizer=tokenizer,
            return_dict_in_generate=True,
        )
        seconds = time.perf_counter() - start
        ids = out.sequences[0].tolist()
        gen = ids[prompt.shape[1] :]
        windows = []
        for g in range(0, len(gen) - size + 1, size):
            context = ids[max(0, prompt.shape[1] + g - size) : prompt.shape[1] + g]
            window = gen[g : g + size]
            with torch.no_grad():
                logits = model(torch.tensor([context + window])).logits[0, len(context) - 1 : -1].float()
            nll = float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(window)[:, None]).sum())
            chars = len(tokenizer.decode(window, skip_special_tokens=True)) or 1
            windows.append((g, nll / chars / LN2))
        first_shift = limit + 1 - prompt.shape[1]
        inside = [b for g, b in windows if g + size <= first_shift]
        after = [b for g, b in windows if g >= first_shift]
        rows.append(
            {
                "seed": seed,
                "prompt_tokens": prompt.shape[1],
                "windows": windows,
                "ref_bpc": next((b for g, b in windows if g == size), None),
                "later_mean_bpc": sum(after) / len(after) if after else None,
                "worst_in_window": max(inside) if inside else None,
                "worst_later": max(after) if after else None,
                "stats": asdict(out.backstep_stats),
                "seconds": seconds,
                "tail": tokenizer.decode(gen[-300:], skip_special_tokens=True),
            }
        )
    return {"limit": limit, "new_tokens": s.smollm2_tokens, "prompt": CHAT_STORY, "runs": rows}


# -- output ----------------------------------------------------------------------------------------------------
def figure(results: dict[str, Any], path: Path, limit: int) -> None:
    from perpetual_logits.analysis.plotting import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, result in results.items():
        curve = result["curve"]
        ax.plot([int(g) for g in curve], list(curve.values()), marker="o", ms=3, label=name)
    ax.axvline(limit, color="grey", ls="--", lw=1, label=f"window ({limit} positions)")
    ax.set_xlabel("generated tokens (window start)")
    ax.set_ylabel("judge bits/char (stories260K)")
    ax.set_title("TinyStories-656K past its window: Method 4 + endings")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    lines = [
        "## Context shift (issue 17)",
        "",
        f"TinyStories-656K, {s['new_tokens']:,} new tokens, {s['prompts']} prompts x {s['seeds']} seeds, Method 4 + "
        f"endings, T 1.0, top-k 50; window {out['limit']} positions; judge windows of {s['judge_window']} tokens. "
        f"Command: `{out['command']}`.",
        "",
        f"| arm | runs | ref bpc (tokens {s['judge_window']}-{2 * s['judge_window']}) | later bpc | "
        "later / ref [95% CI] | worst in-window | worst later | "
        "peak cache | shifts | s/token first -> last (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["results"].items():
        q = r["later_vs_reference"]
        ci = f"[{q['ci95'][0]:.3f}, {q['ci95'][1]:.3f}]" if q["ci95"] else ""
        lines.append(
            f"| {name} | {r['runs']} | {_num(r['reference_bpc (tokens 250-500)'])} | "
            f"{_num(r['later_bpc (after the first shift)'])} | {_num(q['ratio'])} {ci} | "
            f"{_num(r['worst_in_window_bpc'])} | {_num(r['worst_later_bpc'])} | {r['peak_cache_slots']} | "
            f"{r['context_shifts']} | {_num(r['seconds_per_token_first'], 4)} -> "
            f"{_num(r['seconds_per_token_last'], 4)} ({_num(r['time_ratio_last_vs_first'], 2)}) |"
        )
    lines += ["", "Goals:", ""]
    for name, g in out["goals"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k}: {'met' if v else 'missed'}" for k, v in g.items()))
    if out.get("smollm2"):
        lines += ["", f"SmolLM2-135M-Instruct, window forced to {out['smollm2']['limit']}:", ""]
        for row in out["smollm2"]["runs"]:
            lines.append(
                f"- seed {row['seed']}: ref {_num(row['ref_bpc'])}, later mean {_num(row['later_mean_bpc'])}, worst "
                f"in-window {_num(row['worst_in_window'])}, worst later {_num(row['worst_later'])}, shifts "
                f"{row['stats']['context_shifts']}, peak cache {row['stats']['peak_cache_slots']}"
            )
    lines += ["", "Timings from a shared machine are not evidence.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, forced small window: seconds")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--arms", help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch-8 runs")
    parser.add_argument("--limit", type=int, help="force a smaller window than the model's")
    parser.add_argument("--smollm2", action="store_true", help="add the SmolLM2 arm (slow: ~60 ms/token on 2 cores)")
    parser.add_argument("--smollm2-tokens", type=int)
    parser.add_argument("--only-smollm2", action="store_true", help="skip the TinyStories arms")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    s = Settings.smoke() if args.smoke else Settings()
    for name in ("new_tokens", "prompts", "seeds", "limit", "smollm2_tokens"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.arms:
        s.arms = tuple(a.strip() for a in args.arms.split(","))
        unknown = set(s.arms) - set(ARMS)
        if unknown:
            parser.error(f"--arms: unknown {sorted(unknown)}; accepted: {','.join(ARMS)}")
    s.batch = not args.no_batch
    s.smollm2 = args.smollm2 or args.only_smollm2
    if args.only_smollm2:
        s.arms = ()
    if not 1 <= s.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    out_dir = common.out_dir(args.out, args.smoke)
    warnings.filterwarnings("ignore", message="backstep generation: a row may reach")  # the "none" arm, on purpose
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = common.load_tinystories()
    model = make_perpetual(model)
    limit = s.limit or int(model.config.max_position_embeddings)
    from benchmarks.llama2c import load_judge

    judge = load_judge(common.models_dir())
    texts = list(PROMPTS[: s.prompts])
    results, all_goals = {}, {}
    for arm in s.arms:
        runs = [
            r
            for seed in range(s.seeds)
            for i, t in enumerate(texts)
            for r in _single(model, tokenizer, t, i, arm, seed, s)
        ]
        results[f"{arm} (batch 1)"] = evaluate(runs, judge, tokenizer, s, limit)
        print(f"{arm} batch 1 done", flush=True)
        if s.batch and arm != "none":
            runs = [r for seed in range(s.seeds) for r in generate(model, tokenizer, texts, arm, seed, s)]
            results[f"{arm} (batch {len(texts)})"] = evaluate(runs, judge, tokenizer, s, limit)
            print(f"{arm} batch {len(texts)} done", flush=True)
    for name, result in results.items():
        if not name.startswith("none"):
            all_goals[name] = goals(result, limit)
    out: dict[str, Any] = {
        "settings": asdict(s),
        "limit": limit,
        "command": "python benchmarks/context_shift.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": common.environment(),
        "results": results,
        "goals": all_goals,
    }
    if s.smollm2:
        out["smollm2"] = smollm2_arm(s)
    common.write_json(out_dir / "context_shift.json", out)
    (out_dir / "context_shift.md").write_text(markdown(out))
    if results:
        figure(results, out_dir / "context_shift.png", limit)
    print(markdown(out))
    print(f"written to {out_dir}")
    return 0


def _single(model: Any, tokenizer: Any, text: str, index: int, arm: str, seed: int, s: Settings) -> list[Run]:
    runs = generate(model, tokenizer, [text], arm, seed * 1000 + index, s)
    for r in runs:
        r.prompt, r.seed = index, seed
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
