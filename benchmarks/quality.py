"""Quality benchmark: how long, how repetitive and how coherent each method's stories are (TinyStories-656K).

Run ``python benchmarks/quality.py`` (``make bench``), or ``--smoke`` for a seconds-long check. Results:
``<out>/quality.json`` and ``<out>/quality.md``, then ``RESULTS.md`` next to ``<out>`` is regenerated.

Design: several prompts × several seeds; every method runs every (prompt, seed) pair with
``torch.manual_seed(seed)`` set just before it, with the same sampling settings. The baseline stops at EOS;
Methods 1-4 write until ``max_new_tokens``. For each pair, the baseline's length marks "the point where the
model wanted to stop", and the judge (stories260K, an independent model with its own tokenizer) scores each
method's text **after** that point, conditioned on everything before it. The judge's bits per character on the
baseline stories themselves (from the end of the prompt) is the reference line for natural text.

Every metric is defined in :data:`DEFINITIONS`, which is written into the output.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perpetual_logits
from benchmarks import common
from benchmarks.llama2c import load_judge
from perpetual_logits import methods
from perpetual_logits.metrics import (
    compression_ratio,
    count_end_markers,
    ngrams,
    per_thousand,
    rep_n,
)

PROMPTS = (
    "Once upon a time",
    "One day, a little girl named Lily",
    "Tom had a big red ball",
    "The sun was shining and the birds were singing",
    "There was a small dog who",
)
N_REMOVE = 10
PEAK = 2.0
BLOCK = 128

DEFINITIONS = {
    "new tokens": "generated tokens per run (TinyStories-656K tokenizer), the final EOS excluded; median, p10, p90.",
    "stopped": "runs that ended with EOS (baseline) / reached max_new_tokens (methods 1-4).",
    "interventions": "per run, mean: Method 2 EOS evictions, Methods 3-4 backsteps (rewinds; with ending control "
    "also the rewinds of completed end phrases); Method 1 reports Σ p(EOS) over its steps, the expected number "
    "of EOS draws it suppressed.",
    "end markers /1k": "spelled end markers and ending phrases (perpetual_logits.metrics.END_MARKERS: the texts "
    "of well-known end tokens such as '<|end_story|>' written as text, plus ENDING_PHRASES such as 'The End', "
    "'The end.', 'To be continued'; exactly what ban_phrases='default' bans), "
    "case-sensitive, non-overlapping, in the generated text decoded with skip_special_tokens=True; "
    "total count / total new tokens × 1000.",
    "rep-n": "1 − unique n-grams / all n-grams of a run's generated token ids (Su et al. 2022), mean over runs. "
    "Grows with length, so compare with rep-4@128.",
    "rep-4@128": "rep-4 computed in 128-token windows (starting every 64 tokens, plus one window ending at the "
    "last token; a run of at most 128 tokens is one window), mean over windows then over runs: repetition at "
    "equal length.",
    "distinct-n (corpus)": "unique n-grams / all n-grams pooled over all runs of the method (cross-sample "
    "diversity; per text, distinct-n is exactly 1 − rep-n).",
    "compression": "len(UTF-8 bytes) / len(zlib level-9 bytes) of a run's generated text, mean over runs; higher "
    "= more repetitive.",
    "judge bpc after stop": "bits per character, under the stories260K judge, of the method's text after the "
    "point where the baseline (same prompt, same seed) stopped — the first L generated tokens, L = the "
    "baseline's length — conditioned on all text before it; pooled: total NLL / total characters. Runs whose "
    "baseline did not stop are left out. Judge context 512 tokens: longer texts are scored with a strided "
    "window (stride 256, each scored token sees ≥ 256 tokens of context).",
    "judge bpc, natural stories": "the same judge on the baseline's own stories (generated text after the prompt, "
    "conditioned on the prompt): the reference line. Lower = more predictable to the judge. Loops also lower "
    "it, so read it together with rep-n.",
}


@dataclass
class QualitySettings:
    """What one run measures."""

    prompts: tuple[str, ...] = PROMPTS
    seeds: int = 10
    max_new_tokens: int = 480
    top_k: int = 50
    temperature: float = 1.0
    threads: int = 1
    smoke: bool = False

    @property
    def runs(self) -> int:
        return len(self.prompts) * self.seeds

    @classmethod
    def smoke_settings(cls) -> QualitySettings:
        return cls(prompts=PROMPTS[:2], seeds=1, max_new_tokens=200, smoke=True)


@dataclass
class Run:
    """One generation: ids of the generated tokens (EOS excluded) and what the method did."""

    prompt: str
    seed: int
    new_ids: list[int]
    ended_with_eos: bool
    interventions: float
    seconds: float
    text: str = ""
    prompt_text: str = ""
    full_text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def has_ending_control() -> bool:
    """Whether this perpetual_logits has ``BackstepConfig(ban_phrases=...)`` (ending control)."""
    config = getattr(perpetual_logits, "BackstepConfig", None)
    return config is not None and "ban_phrases" in getattr(config, "__dataclass_fields__", {})


def methods_available() -> list[str]:
    names = ["baseline", "Method 1", "Method 2"]
    if hasattr(perpetual_logits, "make_perpetual") and hasattr(perpetual_logits, "BackstepConfig"):
        names += ["Method 3", "Method 4"]
        if has_ending_control():
            names.append("Method 4 + ending control")
    return names


def method_labels() -> dict[str, str]:
    return {
        "baseline": "baseline: stops at EOS",
        "Method 1": "Method 1: EOS suppression",
        "Method 2": f"Method 2: post-EOS resampling, LinearDecay({PEAK}, {N_REMOVE})",
        "Method 3": f"Method 3: backstep, n_remove={N_REMOVE}",
        "Method 4": f"Method 4: backstep + LinearDecay({PEAK}, {N_REMOVE})",
        "Method 4 + ending control": "Method 4 + ending control (ban_phrases='default')",
    }


#: The benchmark's method names → the library's named methods (perpetual_logits.methods.METHODS).
METHOD_NAMES = {
    "baseline": "baseline",
    "Method 1": "suppress",
    "Method 2": "post-eos",
    "Method 3": "backstep",
    "Method 4": "dynamic",
    "Method 4 + ending control": "dynamic+phrases",
}


def generate(
    method: str,
    model: Any,
    perpetual: Any,
    prompt_ids: torch.Tensor,
    settings: QualitySettings,
    tokenizer: Any = None,
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """Run one method once; return (sequence incl. prompt, interventions, extra).

    The ``generate()`` arguments come from :func:`perpetual_logits.methods.generation_arguments`, the same
    switchboard the command line and the demo use.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"`method` must be one of {methods_available()}, got {method!r}")
    eos = int(model.config.eos_token_id)
    method_settings = methods.MethodSettings(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=1.0,
        n_remove=N_REMOVE,
        peak=PEAK,
    )
    plan = methods.generation_arguments(METHOD_NAMES[method], [eos], method_settings, tokenizer)
    kw: dict[str, Any] = {
        **methods.sampling_kwargs(method_settings),
        **plan.kwargs,
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": eos,
        "pad_token_id": 0,
    }
    if not plan.perpetual:
        out = model.generate(prompt_ids, **kw)[0]
        proc = plan.processor
        if isinstance(proc, perpetual_logits.SuppressEOSLogitsProcessor):
            return out, float(sum(proc.eos_probabilities[0])), {}
        if isinstance(proc, perpetual_logits.PostEOSResamplingLogitsProcessor):
            return out, float(len(proc.evictions[0])), {}
        return out, 0.0, {}
    result = perpetual.generate(prompt_ids, return_dict_in_generate=True, **kw)
    events = result.backstep_events[0]
    phrase_rewinds = sum(getattr(e, "reason", "eos") == "phrase" for e in events)
    return (
        result.sequences[0],
        float(len(events)),
        {"removed": sum(e.removed for e in events), "phrase_rewinds": phrase_rewinds},
    )


def run_all(settings: QualitySettings) -> dict[str, list[Run]]:
    """Every method on every (prompt, seed) pair."""
    torch.set_num_threads(settings.threads)
    model, tokenizer = common.load_tinystories()
    perpetual = None
    methods = methods_available()
    if "Method 3" in methods:
        from benchmarks.speed import clone

        perpetual = perpetual_logits.make_perpetual(clone(model))
    else:
        print("[quality] note: perpetual_logits.make_perpetual is not available; Methods 3-4 skipped")
    eos = int(model.config.eos_token_id)
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    for p_index, prompt in enumerate(settings.prompts):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        plen = prompt_ids.shape[1]
        for seed in range(settings.seeds):
            for method in methods:
                torch.manual_seed(seed)
                start = time.perf_counter()
                seq, interventions, extra = generate(method, model, perpetual, prompt_ids, settings, tokenizer)
                elapsed = time.perf_counter() - start
                new = seq[plen:].tolist()
                ended = bool(new) and new[-1] == eos
                if ended:
                    new = new[:-1]
                run = Run(prompt, seed, new, ended, interventions, elapsed, extra=extra)
                run.prompt_text = tokenizer.decode(prompt_ids[0].tolist(), skip_special_tokens=True)
                run.full_text = tokenizer.decode(prompt_ids[0].tolist() + new, skip_special_tokens=True)
                run.text = tokenizer.decode(new, skip_special_tokens=True)
                runs[method].append(run)
        done = (p_index + 1) * settings.seeds
        print(f"[quality] {done}/{settings.runs} (prompt, seed) pairs done")
    return runs


def _prefix_chars(full: str, prefix: str) -> int:
    """Characters of ``full`` covered by ``prefix`` (decoding is prefix-consistent except at a split UTF-8
    character, where the common prefix is used)."""
    if full.startswith(prefix):
        return len(prefix)
    n = 0
    for a, b in zip(full, prefix):
        if a != b:
            break
        n += 1
    return n


def block_rep(tokens: Sequence[int], n: int, block: int = BLOCK) -> float:
    """Mean rep-n over ``block``-token windows: starts every ``block // 2`` tokens, plus one window ending at the
    last token (so the tail counts); a text of at most ``block`` tokens is one window."""
    if len(tokens) <= block:
        return rep_n(tokens, n)
    starts = list(range(0, len(tokens) - block + 1, block // 2))
    if starts[-1] != len(tokens) - block:
        starts.append(len(tokens) - block)
    return sum(rep_n(tokens[i : i + block], n) for i in starts) / len(starts)


def evaluate(runs: dict[str, list[Run]], settings: QualitySettings, tokenizer: Any) -> dict[str, Any]:
    """Per-method metrics, the judge scores and the reference line."""
    judge = load_judge(common.models_dir())
    baseline = {(r.prompt, r.seed): r for r in runs["baseline"]}
    labels = method_labels()
    methods: dict[str, Any] = {}
    for method, method_runs in runs.items():
        lengths = [len(r.new_ids) for r in method_runs]
        total = sum(lengths)
        markers = sum(count_end_markers(r.text) for r in method_runs)
        pooled = {n: [g for r in method_runs for g in ngrams(r.new_ids, n)] for n in (2, 3, 4)}
        texts, starts, after_tokens, skipped = [], [], 0, 0
        for r in method_runs:
            base = baseline[(r.prompt, r.seed)]
            if not base.ended_with_eos:
                skipped += 1  # the baseline never stopped: there is no "after"
                continue
            cut = len(base.new_ids)
            if len(r.new_ids) <= cut:
                continue
            prefix = tokenizer.decode(tokenizer(r.prompt).input_ids + r.new_ids[:cut], skip_special_tokens=True)
            texts.append(r.full_text)
            starts.append(_prefix_chars(r.full_text, prefix))
            r.extra["stop_char"] = starts[-1]
            after_tokens += len(r.new_ids) - cut
        scored_chars = sum(len(t) - s for t, s in zip(texts, starts))
        bpc = judge.bits_per_char(texts, starts) if scored_chars else None
        lengths_summary = common.summary(lengths)
        methods[method] = {
            "label": labels[method],
            "runs": len(method_runs),
            "lengths": lengths,
            "new_tokens": lengths_summary,
            "ended_with_eos": sum(r.ended_with_eos for r in method_runs),
            "reached_max": sum(len(r.new_ids) >= settings.max_new_tokens for r in method_runs),
            "interventions_per_run": common.summary([r.interventions for r in method_runs]),
            "interventions_per_1k": per_thousand(sum(r.interventions for r in method_runs), total),
            "end_markers": markers,
            "end_markers_per_1k": per_thousand(markers, total),
            "rep": {n: sum(rep_n(r.new_ids, n) for r in method_runs) / len(method_runs) for n in (2, 3, 4)},
            "rep4_block": sum(block_rep(r.new_ids, 4) for r in method_runs) / len(method_runs),
            "distinct_corpus": {n: (len(set(g)) / len(g) if g else 1.0) for n, g in pooled.items()},
            "compression": sum(compression_ratio(r.text) for r in method_runs) / len(method_runs),
            "judge_bpc_after": bpc,
            "judge_chars_after": scored_chars,
            "judge_tokens_after": after_tokens,
            "judge_runs_after": len(texts),
            "judge_runs_skipped_baseline_not_stopped": skipped,
            "seconds_per_run": common.summary([r.seconds for r in method_runs]),
        }
    natural = runs["baseline"]
    reference = judge.bits_per_char(
        [r.full_text for r in natural], [_prefix_chars(r.full_text, r.prompt_text) for r in natural]
    )
    return {"methods": methods, "reference": {"judge_bpc_natural": reference}}


def samples(runs: dict[str, list[Run]], before: int = 150, after: int = 450) -> dict[str, str]:
    """Text of the first (prompt, seed) pair per method around the baseline's stopping point, marked ``‖``."""
    out: dict[str, str] = {}
    for method, method_runs in runs.items():
        run = method_runs[0]
        text = run.full_text
        stop = run.extra.get("stop_char")
        if stop is None:  # the baseline itself, or no text after the stop: show the end of the story
            head = "…" if len(text) > before + after else ""
            out[method] = head + text[-(before + after) :]
            continue
        head = "…" if stop > before else ""
        tail = "…" if len(text) > stop + after else ""
        out[method] = f"{head}{text[max(stop - before, 0) : stop]} ‖ {text[stop : stop + after]}{tail}"
    return out


def markdown(out: dict[str, Any]) -> str:
    """The quality section of RESULTS.md."""
    s = out["settings"]
    lines = [
        "## Quality",
        "",
        f"TinyStories-656K, {s['runs']} runs per method: {len(s['prompts'])} prompts × {s['seeds']} seeds "
        f"(`torch.manual_seed(seed)` before every run), `do_sample=True, top_k={s['top_k']}, "
        f"temperature={s['temperature']}, max_new_tokens={s['max_new_tokens']}` (the model's context is 512). "
        "Judge: stories260K (llama2.c checkpoint, its own 512-piece tokenizer), never used for generation.",
        "",
        "| method | new tokens median [p10–p90] | stopped at EOS / reached max | interventions per run "
        "| end markers /1k | rep-2 | rep-3 | rep-4 | rep-4@128 | distinct-2/3/4 (corpus) | compression "
        "| judge bpc after stop (runs, chars) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in out["methods"].values():
        nt = m["new_tokens"]
        inter = m["interventions_per_run"]
        bpc = m["judge_bpc_after"]
        judge = f"{bpc:.3f} ({m['judge_runs_after']}, {m['judge_chars_after']:,})" if bpc is not None else "—"
        d = m["distinct_corpus"]
        lines.append(
            f"| {m['label']} | {nt['median']:.0f} [{nt['p10']:.0f}–{nt['p90']:.0f}] "
            f"| {m['ended_with_eos']} / {m['reached_max']} | {inter['mean']:.2f} "
            f"| {m['end_markers_per_1k']:.2f} | {m['rep']['2']:.3f} | {m['rep']['3']:.3f} | {m['rep']['4']:.3f} "
            f"| {m['rep4_block']:.3f} | {d['2']:.3f} / {d['3']:.3f} / {d['4']:.3f} | {m['compression']:.2f} "
            f"| {judge} |"
        )
    ref = out["reference"]["judge_bpc_natural"]
    lines += [
        "",
        f"Reference line: judge bits/char on natural stories (the baseline's own text) = **{ref:.3f}**.",
        "",
    ]
    for note in out.get("notes", []):
        lines += [f"Note: {note}", ""]
    lines += ["### Definitions", ""]
    for name, text in out["definitions"].items():
        lines.append(f"- **{name}**: {text}")
    lines += [
        "",
        "### Samples",
        "",
        "First (prompt, seed) pair of each method: the baseline's ending, and each method's text around the "
        "point where the baseline stopped (marked ‖). ⏎ is a newline.",
        "",
    ]
    for method, text in out["samples"].items():
        quoted = text.replace("\n", " ⏎ ")
        lines.append(f"- *{method}*: {quoted}")
    return "\n".join(lines) + "\n"


def _stringify_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _stringify_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_keys(v) for v in value]
    return value


def _command(argv: Sequence[str] | None) -> str:
    return " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]).strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: generate, evaluate, write ``quality.json`` and ``quality.md``, regenerate RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run: 2 prompts, 1 seed, 200 tokens")
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt (default 10)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per run (default 480)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md")
    parser.add_argument("--recorded-command", help=argparse.SUPPRESS)  # run_all.py records its own command
    args = parser.parse_args(argv)
    settings = QualitySettings.smoke_settings() if args.smoke else QualitySettings()
    for name in ("seeds", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(settings, name, value)
    out_dir = common.out_dir(args.out, args.smoke)
    common.quiet_transformers()
    start = time.perf_counter()
    runs = run_all(settings)
    _, tokenizer = common.load_tinystories()
    result: dict[str, Any] = {
        "settings": {**asdict(settings), "runs": settings.runs},
        "environment": common.environment(),
        "command": args.recorded_command or _command(argv),
        "definitions": DEFINITIONS,
        "notes": [],
    }
    if "Method 3" not in runs:
        result["notes"].append("perpetual_logits.make_perpetual is not available: Methods 3-4 were skipped")
    if "Method 4 + ending control" not in runs:
        result["notes"].append(
            "The issue's 'best configuration with ending control' arm was skipped: this perpetual_logits has no "
            "BackstepConfig(ban_phrases=...)."
        )
    result.update(evaluate(runs, settings, tokenizer))
    result["samples"] = samples(runs)
    result["seconds"] = time.perf_counter() - start
    result = _stringify_keys(result)
    common.write_json(out_dir / "quality.json", result)
    (out_dir / "quality.md").write_text(markdown(result))
    print(f"[quality] wrote {out_dir / 'quality.json'} and {out_dir / 'quality.md'} ({result['seconds']:.0f} s)")
    if not args.no_report:
        from benchmarks import report

        report.write_report(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
