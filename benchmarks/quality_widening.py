"""Method 2 with widened truncation: does widening top-k after an eviction help, or drift from the story?

Run ``python benchmarks/quality_widening.py`` (about 6 minutes on 2 cores), or ``--smoke`` for a seconds-long
check. Results: ``<out>/quality_widening.json`` and ``<out>/quality_widening.md`` (``benchmarks/results`` by
default; a temporary folder with ``--smoke``).

Arms (TinyStories-656K, ``do_sample=True``, configured ``top_k=50``, temperature 1.0, as in
``benchmarks/quality.py``): the baseline (stops at EOS), Method 2 with the temperature schedule only (what
quality.py runs), Method 2 with the temperature schedule plus top-k widened after each eviction (to 200, and to
the full vocabulary), and widening without the temperature boost. Every arm runs every (prompt, seed) pair
with ``torch.manual_seed(seed)`` set just before it. Until a row's first eviction all Method 2 arms sample the
same distribution, so they differ only by what happens after evictions.

The judge (stories260K, an independent model) scores **equal token windows** placed at the same point in every
Method 2 arm: the run's first eviction ``E`` (the step at which it first wanted to stop), which is the same step
in every Method 2 arm, with the same text before it, because they draw the same random numbers until then
(checked). "near" is tokens ``[E, E + W)``, "far" ``[E + W, E + 2W)``; the reference line is ``[E - W, E)``, the
same run's own story before it wanted to stop. Only pairs with ``W <= E <= max_new_tokens - 2W`` count, the
same pairs for every arm. Drift from the story is measured twice: the judge's *context gain* (bits/char saved
on the window by conditioning on the text before it, against scoring the window alone) and the share of the
window's words that occur in the story before ``E``.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perpetual_logits as pl
from benchmarks import common
from benchmarks.llama2c import Judge, load_judge
from benchmarks.quality import PROMPTS, _prefix_chars, block_rep
from perpetual_logits.analysis.metrics import count_end_markers, ngrams, per_thousand, rep_n

PEAK, STEPS, TOP_K = 2.0, 10, 50

ARMS: dict[str, str] = {
    "baseline": "baseline: stops at EOS",
    "temperature only": f"Method 2, LinearDecay({PEAK}, {STEPS}), top_k={TOP_K} (temperature only)",
    "temperature + top-k 200": f"Method 2, LinearDecay({PEAK}, {STEPS}) + top_k {TOP_K}→200 on the same schedule",
    "temperature + full vocab": f"Method 2, LinearDecay({PEAK}, {STEPS}) + top_k {TOP_K}→off (full vocabulary)",
    "top-k 200, no temperature": f"Method 2, multiplier 1.0 + top_k {TOP_K}→200 on LinearDecay({PEAK}, {STEPS})",
}

DEFINITIONS = {
    "new tokens": "generated tokens per run, final EOS excluded; median.",
    "evictions": "Method 2 evictions per run, mean.",
    "end markers /1k": "spelled end markers and ending phrases (perpetual_logits.analysis.metrics.END_MARKERS) per "
    "1,000 generated tokens, all runs pooled.",
    "rep-4": "1 − unique 4-grams / all 4-grams of a run's token ids, mean over runs; rep-4@128: the same in "
    "128-token windows (benchmarks.quality.block_rep).",
    "distinct-2": "unique bigrams / all bigrams pooled over the arm's runs (cross-sample diversity).",
    "judge bpc after stop": "as in quality.py: bits/char of all text after the baseline's stopping point, "
    "conditioned on the text before it (lengths differ per pair, equal across Method 2 arms).",
    "judge bpc near / far": "bits/char of tokens [E, E + W) (near) and [E + W, E + 2W) (far), E = the run's "
    "first eviction, each conditioned on all text before it; pooled over the pairs with W ≤ E ≤ "
    "max_new_tokens − 2W (the same pairs, the same E and the same text before E in every Method 2 arm).",
    "context gain near / far": "bits/char of the window scored alone (no story before it) minus bits/char "
    "conditioned on the story: how much the story predicts the window. Lower = the window relates less to "
    "its context (drift).",
    "story words near / far": "share of the window's distinct words (lower-cased, letters only, ≥ 3 letters) "
    "that occur in the prompt and generated text before E, mean over pairs.",
}


@dataclass
class WideningSettings:
    prompts: tuple[str, ...] = PROMPTS
    seeds: int = 10
    max_new_tokens: int = 480
    window: int = 100
    threads: int = 1
    smoke: bool = False

    @property
    def runs(self) -> int:
        return len(self.prompts) * self.seeds

    @classmethod
    def smoke_settings(cls) -> WideningSettings:
        return cls(prompts=PROMPTS[:2], seeds=1, max_new_tokens=300, window=30, smoke=True)


@dataclass
class Run:
    prompt: str
    seed: int
    prompt_ids: list[int]
    new_ids: list[int]
    ended_with_eos: bool
    evictions: int
    first_eviction: int | None
    seconds: float
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def make_processor(arm: str, eos: int) -> Any:
    """The Method 2 processor of ``arm`` (None for the baseline)."""
    schedule = pl.LinearDecay(PEAK, STEPS)
    configured = pl.Truncation(top_k=TOP_K)
    if arm == "baseline":
        return None
    if arm == "temperature only":
        return pl.PostEOSResamplingLogitsProcessor(eos, schedule=schedule)
    if arm == "temperature + top-k 200":
        return pl.PostEOSResamplingLogitsProcessor(
            eos, schedule=schedule, widen=pl.Widening(top_k=200), truncation=configured
        )
    if arm == "temperature + full vocab":
        return pl.PostEOSResamplingLogitsProcessor(
            eos, schedule=schedule, widen=pl.Widening(top_k=0), truncation=configured
        )
    if arm == "top-k 200, no temperature":
        return pl.PostEOSResamplingLogitsProcessor(
            eos,
            schedule=pl.Constant(1.0, steps=1),
            widen=pl.Widening(top_k=200, schedule=schedule),
            truncation=configured,
        )
    raise ValueError(f"`arm` must be one of {list(ARMS)}, got {arm!r}")


def run_all(settings: WideningSettings) -> dict[str, list[Run]]:
    torch.set_num_threads(settings.threads)
    model, tokenizer = common.load_tinystories()
    eos = int(model.config.eos_token_id)
    runs: dict[str, list[Run]] = {arm: [] for arm in ARMS}
    for p_index, prompt in enumerate(settings.prompts):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        plen = prompt_ids.shape[1]
        for seed in range(settings.seeds):
            for arm in ARMS:
                proc = make_processor(arm, eos)
                kw: dict[str, Any] = {"do_sample": True, "top_k": TOP_K, "temperature": 1.0}
                if proc is not None and proc.truncation is not None:
                    kw = proc.generate_kwargs()  # the processor truncates; transformers must not
                torch.manual_seed(seed)
                start = time.perf_counter()
                seq = model.generate(
                    prompt_ids,
                    logits_processor=[proc] if proc is not None else None,
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=0,
                    **kw,
                )[0]
                elapsed = time.perf_counter() - start
                new = seq[plen:].tolist()
                ended = bool(new) and new[-1] == eos
                if ended:
                    new = new[:-1]
                steps = proc.evictions[0] if proc is not None else []
                first = steps[0] if steps else None
                run = Run(prompt, seed, prompt_ids[0].tolist(), new, ended, len(steps), first, elapsed)
                run.text = tokenizer.decode(new, skip_special_tokens=True)
                runs[arm].append(run)
        print(f"[widening] {(p_index + 1) * settings.seeds}/{settings.runs} (prompt, seed) pairs done")
    return runs


_WORD = re.compile(r"[a-z]{3,}")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def window_scores(
    judge: Judge, tokenizer: Any, runs: list[Run], cuts: list[int], offset: int, width: int
) -> dict[str, Any]:
    """Judge bits/char of tokens [cut + offset, cut + offset + width) of each run, with and without the story
    before them, and the share of the window's words found in the story before ``cut``; pooled, and per pair
    (``per_pair``: NLL in nats and characters, with and without context, and the word share)."""
    per_pair: dict[str, list[float]] = {"nll": [], "chars": [], "nll_alone": [], "chars_alone": [], "words": []}
    for run, cut in zip(runs, cuts):
        a, b = cut + offset, cut + offset + width
        full = tokenizer.decode(run.prompt_ids + run.new_ids[:b], skip_special_tokens=True)
        head = tokenizer.decode(run.prompt_ids + run.new_ids[:a], skip_special_tokens=True)
        nll, chars = judge.nll(full, _prefix_chars(full, head))
        window = tokenizer.decode(run.new_ids[a:b], skip_special_tokens=True)
        nll_alone, chars_alone = judge.nll(window, 0)
        story = _words(tokenizer.decode(run.prompt_ids + run.new_ids[:cut], skip_special_tokens=True))
        words = _words(window)
        for key, value in zip(per_pair, (nll, chars, nll_alone, chars_alone)):
            per_pair[key].append(float(value))
        per_pair["words"].append(len(words & story) / len(words) if words else 0.0)
    return {**_pooled(per_pair, range(len(runs))), "pairs": len(runs), "per_pair": per_pair}


def _pooled(per_pair: dict[str, list[float]], index: Sequence[int]) -> dict[str, float]:
    """Pooled bits/char with and without context, their difference, and the mean word share over ``index``."""
    sums = {key: sum(values[i] for i in index) for key, values in per_pair.items()}
    bpc = sums["nll"] / (sums["chars"] * math.log(2))
    bpc_alone = sums["nll_alone"] / (sums["chars_alone"] * math.log(2))
    return {
        "bpc": bpc,
        "bpc_alone": bpc_alone,
        "context_gain": bpc_alone - bpc,
        "story_words": sums["words"] / len(index),
    }


def paired_intervals(
    arm: dict[str, Any], reference: dict[str, Any], resamples: int = 2000, seed: int = 0
) -> dict[str, list[float]]:
    """95 % paired-bootstrap intervals (pairs resampled) of ``arm − reference`` for each pooled statistic:
    ``[point estimate, low, high]``."""
    n = reference["pairs"]
    rng = random.Random(seed)
    diffs: dict[str, list[float]] = {}
    for _ in range(resamples):
        index = [rng.randrange(n) for _ in range(n)]
        ours, theirs = _pooled(arm["per_pair"], index), _pooled(reference["per_pair"], index)
        for key, value in ours.items():
            diffs.setdefault(key, []).append(value - theirs[key])
    point_ours, point_theirs = _pooled(arm["per_pair"], range(n)), _pooled(reference["per_pair"], range(n))
    return {
        key: [point_ours[key] - point_theirs[key], common.percentile(v, 2.5), common.percentile(v, 97.5)]
        for key, v in diffs.items()
    }


def evaluate(runs: dict[str, list[Run]], settings: WideningSettings, tokenizer: Any) -> dict[str, Any]:
    judge = load_judge(common.models_dir())
    baseline = {(r.prompt, r.seed): r for r in runs["baseline"]}
    w = settings.window
    method2 = [arm for arm in ARMS if arm != "baseline"]
    anchor = {(r.prompt, r.seed): r for r in runs[method2[0]]}
    # The anchor E of a pair: the first eviction, identical in every Method 2 arm with the same text before it.
    mismatched = 0
    for key, ref in anchor.items():
        for arm in method2[1:]:
            other = next(r for r in runs[arm] if (r.prompt, r.seed) == key)
            e = ref.first_eviction
            if other.first_eviction != e or (e is not None and other.new_ids[:e] != ref.new_ids[:e]):
                mismatched += 1
    eligible = {
        key
        for key, r in anchor.items()
        if r.first_eviction is not None and w <= r.first_eviction <= settings.max_new_tokens - 2 * w
    }
    arms: dict[str, Any] = {}
    for arm, arm_runs in runs.items():
        total = sum(len(r.new_ids) for r in arm_runs)
        bigrams = [g for r in arm_runs for g in ngrams(r.new_ids, 2)]
        entry: dict[str, Any] = {
            "label": ARMS[arm],
            "runs": len(arm_runs),
            "new_tokens": common.summary([len(r.new_ids) for r in arm_runs]),
            "ended_with_eos": sum(r.ended_with_eos for r in arm_runs),
            "evictions_per_run": sum(r.evictions for r in arm_runs) / len(arm_runs),
            "end_markers_per_1k": per_thousand(sum(count_end_markers(r.text) for r in arm_runs), total),
            "rep4": sum(rep_n(r.new_ids, 4) for r in arm_runs) / len(arm_runs),
            "rep4_block": sum(block_rep(r.new_ids, 4) for r in arm_runs) / len(arm_runs),
            "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 1.0,
            "seconds_per_run": common.summary([r.seconds for r in arm_runs]),
        }
        if arm != "baseline":
            chosen = [r for r in arm_runs if (r.prompt, r.seed) in eligible]
            cuts = [anchor[(r.prompt, r.seed)].first_eviction or 0 for r in chosen]
            entry["near"] = window_scores(judge, tokenizer, chosen, cuts, 0, w) if chosen else None
            entry["far"] = window_scores(judge, tokenizer, chosen, cuts, w, w) if chosen else None
            after_texts, after_starts = [], []  # quality.py's measure: all text after the baseline's stop
            for r in arm_runs:
                base = baseline[(r.prompt, r.seed)]
                if not base.ended_with_eos or len(r.new_ids) <= len(base.new_ids):
                    continue
                full = tokenizer.decode(r.prompt_ids + r.new_ids, skip_special_tokens=True)
                head = tokenizer.decode(r.prompt_ids + r.new_ids[: len(base.new_ids)], skip_special_tokens=True)
                after_texts.append(full)
                after_starts.append(_prefix_chars(full, head))
            entry["judge_bpc_after"] = judge.bits_per_char(after_texts, after_starts) if after_texts else None
        arms[arm] = entry
    # Paired differences to the temperature-only arm, on the same pairs and windows.
    reference_arm = arms[method2[0]]
    for arm in method2[1:]:
        entry = arms[arm]
        if entry["near"] and reference_arm["near"]:
            entry["vs_temperature_only"] = {
                where: paired_intervals(entry[where], reference_arm[where]) for where in ("near", "far")
            }
    # Reference: the same runs' own story before they first wanted to stop, [E - W, E).
    chosen = [r for key, r in anchor.items() if key in eligible]
    cuts = [(r.first_eviction or 0) - w for r in chosen]
    reference = window_scores(judge, tokenizer, chosen, cuts, 0, w) if chosen else None
    return {
        "arms": arms,
        "reference_before_first_eviction": reference,
        "eligible_pairs": len(eligible),
        "pairs_whose_method2_arms_differ_before_first_eviction": mismatched,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    w = s["window"]
    lines = [
        "## Method 2: temperature only vs temperature + widened truncation",
        "",
        f"TinyStories-656K, {s['runs']} runs per arm: {len(s['prompts'])} prompts × {s['seeds']} seeds "
        f"(`torch.manual_seed(seed)` before every run), `do_sample=True`, configured `top_k={TOP_K}`, temperature "
        f"1.0, `max_new_tokens={s['max_new_tokens']}`. Judge: stories260K. Equal windows: W = {w} tokens from "
        f"the run's first eviction E (near) and the next {w} (far), over the {out['eligible_pairs']} pairs with "
        f"{w} ≤ E ≤ {s['max_new_tokens'] - 2 * w} (the same pairs and the same E in every Method 2 arm; pairs "
        "whose Method 2 arms differ before E: "
        f"{out['pairs_whose_method2_arms_differ_before_first_eviction']}).",
        "",
        "| arm | new tokens (median) | evictions /run | end markers /1k | rep-4 | rep-4@128 | distinct-2 "
        "| judge bpc after stop | judge bpc near / far | context gain near / far | story words near / far |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for a in out["arms"].values():
        near, far = a.get("near"), a.get("far")
        if near and far:
            judge = f"{near['bpc']:.3f} / {far['bpc']:.3f}"
            gain = f"{near['context_gain']:.3f} / {far['context_gain']:.3f}"
            words = f"{near['story_words']:.3f} / {far['story_words']:.3f}"
        else:
            judge = gain = words = "—"
        lines.append(
            f"| {a['label']} | {a['new_tokens']['median']:.0f} | {a['evictions_per_run']:.2f} "
            f"| {a['end_markers_per_1k']:.2f} | {a['rep4']:.3f} | {a['rep4_block']:.3f} | {a['distinct2']:.3f} "
            f"| {_fmt(a.get('judge_bpc_after'))} | {judge} | {gain} | {words} |"
        )
    ref = out["reference_before_first_eviction"]
    if ref:
        lines += [
            "",
            f"Reference, the same runs' own story before they first wanted to stop (tokens [E − {w}, E), the same "
            f"in every Method 2 arm): judge bpc {ref['bpc']:.3f}, context gain {ref['context_gain']:.3f}, story "
            f"words {ref['story_words']:.3f} (words of the window found in the text before it).",
        ]
    if any(a.get("vs_temperature_only") for a in out["arms"].values()):
        lines += [
            "",
            "Difference to the temperature-only arm on the same pairs and windows (point estimate [95 % paired "
            "bootstrap interval, pairs resampled]); an interval that contains 0 is no measured difference:",
            "",
            "| arm | Δ judge bpc near | Δ judge bpc far | Δ context gain near | Δ context gain far "
            "| Δ story words near | Δ story words far |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in out["arms"].values():
            vs = a.get("vs_temperature_only")
            if vs:
                cells = [
                    "{:+.3f} [{:+.3f}, {:+.3f}]".format(*vs[where][key])
                    for key in ("bpc", "context_gain", "story_words")
                    for where in ("near", "far")
                ]
                lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    lines += ["", "### Definitions", ""]
    lines += [f"- **{name}**: {text}" for name, text in out["definitions"].items()]
    lines += ["", f"Command: `{out['command']}`; {out['seconds']:.0f} s; {out['environment']['cpu']}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run: 2 prompts, 1 seed, 300 tokens")
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt (default 10)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    settings = WideningSettings.smoke_settings() if args.smoke else WideningSettings()
    for name in ("seeds", "threads"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name} must be >= 1, got {value}")
            setattr(settings, name, value)
    out_dir = common.out_dir(args.out, args.smoke)
    common.quiet_transformers()
    start = time.perf_counter()
    runs = run_all(settings)
    _, tokenizer = common.load_tinystories()
    given = list(argv) if argv is not None else sys.argv[1:]
    result: dict[str, Any] = {
        "settings": {**asdict(settings), "runs": settings.runs},
        "environment": common.environment(),
        "command": " ".join(["python benchmarks/quality_widening.py", *given]),
        "definitions": DEFINITIONS,
    }
    result.update(evaluate(runs, settings, tokenizer))
    result["seconds"] = time.perf_counter() - start
    common.write_json(out_dir / "quality_widening.json", result)
    (out_dir / "quality_widening.md").write_text(markdown(result))
    print(f"[widening] wrote {out_dir / 'quality_widening.json'} and .md ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
