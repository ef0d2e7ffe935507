"""Regenerate ``RESULTS.md`` (next to the results folder) and the PNG plots from ``speed.json`` / ``quality.json``.

``python benchmarks/report.py [--out benchmarks/results]`` rebuilds the report from whatever result files exist;
the benchmark scripts call :func:`write_report` themselves after each run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

RUN_ALL = "python benchmarks/run_all.py"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _plot_speed(speed: dict[str, Any], out_dir: Path) -> str | None:
    """Bar chart of ratios to plain generate() per model, with the targets as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = speed.get("models", {})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        arms = [a for a in model["arms"] if a != "plain generate()"]
        values = [model["arms"][a]["ratio_to_plain"]["of_medians"] for a in arms]
        lows = [model["arms"][a]["ratio_to_plain"]["paired"]["min"] for a in arms]
        highs = [model["arms"][a]["ratio_to_plain"]["paired"]["max"] for a in arms]
        err = [[max(v - lo, 0) for v, lo in zip(values, lows)], [max(h - v, 0) for v, h in zip(values, highs)]]
        ax.barh(range(len(arms)), values, xerr=err, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(arms)))
        ax.set_yticklabels([a.replace(": ", ":\n", 1) for a in arms], fontsize=7)
        ax.axvline(1.0, color="black", lw=0.8)
        bound = 1.10 if "656k" in name else 1.02
        ax.axvline(bound, color="tab:red", ls="--", lw=0.8, label=f"processor target {bound}")
        ax.set_xlabel("time per token / plain generate()")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out_dir / "speed_ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_lengths(quality: dict[str, Any], out_dir: Path) -> str | None:
    """Box plot of new tokens per arm (one row per arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = quality.get("methods", {})
    if not methods:
        return None
    names = list(methods)
    data = [methods[m]["lengths"] for m in names]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(names)))
    horizontal = (
        {"orientation": "horizontal"}
        if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (3, 10)
        else {"vert": False}
    )
    ax.boxplot(data, whis=(10, 90), showfliers=True, **horizontal)
    ax.set_yticks(range(1, len(names) + 1))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("new tokens per run")
    ax.set_title(f"Length distribution ({quality['settings']['runs']} runs per arm; whiskers p10–p90)", fontsize=9)
    fig.tight_layout()
    path = out_dir / "quality_lengths.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_judge(quality: dict[str, Any], out_dir: Path) -> str | None:
    """Judge bits/char past the baseline's stopping point per arm: to the end of the run and in the equal
    token window (with its 95 % interval), with the natural-stories reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {k: v for k, v in quality.get("methods", {}).items() if v.get("judge_bpc_after") is not None}
    if not methods:
        return None
    names = list(methods)
    after = [methods[m]["judge_bpc_after"] for m in names]
    window = [methods[m].get("judge_bpc_window") for m in names]
    fig, ax = plt.subplots(figsize=(8, 2.2 + 0.4 * len(names)))
    y = list(range(len(names)))
    height = 0.4
    ax.barh([i - height / 2 for i in y], after, height, color="tab:green", alpha=0.8, label="after stop, to the end")
    if any(w is not None for w in window):
        tokens = quality.get("reference", {}).get("judge_window_tokens", "?")
        values = [w if w is not None else 0.0 for w in window]
        cis = [methods[m].get("judge_bpc_window_ci95") for m in names]
        err = [
            [max(v - ci[0], 0) if ci else 0 for v, ci in zip(values, cis)],
            [max(ci[1] - v, 0) if ci else 0 for v, ci in zip(values, cis)],
        ]
        ax.barh(
            [i + height / 2 for i in y],
            values,
            height,
            xerr=err,
            color="tab:blue",
            alpha=0.8,
            label=f"equal window of {tokens} tokens after stop (95 % CI)",
        )
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    reference = quality.get("reference", {}).get("judge_bpc_natural")
    if reference is not None:
        ax.axvline(reference, color="black", ls="--", lw=1, label=f"natural stories (baseline): {reference:.3f}")
    ax.set_xlabel("judge bits / character (stories260K)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.set_title("Text after the point where the baseline stopped", fontsize=9)
    fig.tight_layout()
    path = out_dir / "quality_judge_bpc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _environment_lines(env: dict[str, Any]) -> list[str]:
    return [
        f"- Run: {env.get('date', '?')} (UTC); 1/5/15-minute load average at start: "
        f"{env.get('load_average_at_start', '?')} (well above 0: other processes were competing for the CPU)",
        f"- Machine: {env.get('cpu')}, {env.get('cpu_count')} logical cores visible, "
        f"{env.get('torch_threads')} torch thread(s); {env.get('platform')}",
        f"- Versions: Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}",
    ]


def build_markdown(out_dir: Path) -> str:
    """The text of RESULTS.md from the result files in ``out_dir`` (plots are written there too)."""
    speed = _load(out_dir / "speed.json")
    quality = _load(out_dir / "quality.json")
    rel = out_dir.name
    lines = [
        "# perpetual_logits benchmarks",
        "",
        f"Regenerate everything with `{RUN_ALL}` (`make bench`); add `--smoke` for a seconds-long check. "
        "The numbers below come from the runs recorded here, on the machine listed with each section; CPU "
        "timings on a shared machine are noisy, so read ratios with their min–max.",
        "",
    ]
    if speed is None and quality is None:
        lines.append("No results yet: run the command above.")
    if speed is not None:
        lines += [f"Speed command: `{speed.get('command', 'python benchmarks/speed.py')}`", ""]
        lines += [*_environment_lines(speed.get("environment", {})), ""]
        lines.append((out_dir / "speed.md").read_text() if (out_dir / "speed.md").is_file() else "")
        plot = _plot_speed(speed, out_dir)
        if plot:
            lines += [f"![speed ratios]({rel}/{plot})", ""]
    if quality is not None:
        lines += [f"Quality command: `{quality.get('command', 'python benchmarks/quality.py')}`", ""]
        lines += [*_environment_lines(quality.get("environment", {})), ""]
        lines.append((out_dir / "quality.md").read_text() if (out_dir / "quality.md").is_file() else "")
        for plot, alt in (
            (_plot_lengths(quality, out_dir), "length distribution"),
            (_plot_judge(quality, out_dir), "judge bits per character"),
        ):
            if plot:
                lines += [f"![{alt}]({rel}/{plot})", ""]
    lines += _batch_section(out_dir)
    # Results that other scripts write as markdown of their own (each says its command and machine).
    for name, title in (
        ("quality_chat.md", "Quality on a chat model (SmolLM2-135M-Instruct)"),
        ("chat_preset/quality_chat.md", "The chat preset on SmolLM2 (endings, loops, preset)"),
        ("quality_widening.md", "Method 2: widened truncation after an eviction"),
        ("vllm.md", "Serving with vLLM"),
    ):
        path = out_dir / name
        if path.is_file():
            lines += [f"## {title}", "", f"From [{rel}/{name}]({rel}/{name}).", "", _demote(path.read_text()), ""]
    return "\n".join(lines).rstrip() + "\n"


def _demote(text: str) -> str:
    """Nest a results file's own headings under this report's section heading."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def _batch_section(out_dir: Path) -> list[str]:
    """Backstep in batches on a GPU (``python benchmarks/batch.py --gpu``), one table row per run and batch."""
    runs = sorted(out_dir.glob("batch_gpu*.json"))
    if not runs:
        return []
    lines = [
        "## Backstep in batches (GPU)",
        "",
        "`python benchmarks/batch.py --gpu --repeats 3`: a random-weight Llama of TinyLlama-1.1B's shape in bf16, "
        "sdpa attention, 16-token prompts, 256 new tokens, sampling; a processor forces EOS on 2% of (row, step) "
        "pairs, so rows rewind at different times (n_remove 10). *step ratio*: backstep time per forward over plain "
        "`generate()`'s time per step at the same batch size; *vs ideal*: backstep total time over plain's time per "
        "step × the forwards backstep took (1.0 = a rewind costs exactly the tokens it regenerates); *peak slots*: "
        "the largest cache length, against plain `generate()`'s. Medians of interleaved repeats.",
        "",
        "| run | device | batch | plain ms/step | backstep ms/forward | step ratio | forwards / plain | vs ideal "
        "| rewinds | peak slots (plain) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    extra: list[str] = []
    for path in runs:
        data = json.loads(path.read_text())
        device = "H200" if "h200" in path.name else "GPU"
        for arm in data.get("batches", []):
            lines.append(
                f"| {path.stem} | {device} | {arm['batch']} | {arm['plain_ms_per_step']:.1f} | "
                f"{arm['backstep_ms_per_forward']:.1f} | {arm['step_ratio']:.2f} | "
                f"{arm['forward_count_ideal_vs_plain']:.2f} | {arm['total_vs_ideal']:.2f} | {arm['rewinds']:.0f} | "
                f"{arm['peak_cache_slots']} ({arm['plain_peak_cache_slots']}) |"
            )
        compiled = data.get("compile")
        if compiled:
            extra.append(
                f"- {path.stem}: static cache + `torch.compile`, batch 1: plain {compiled['plain_ms_per_step']:.2f} "
                f"ms/step, backstep without EOS {compiled['backstep_no_eos_ms_per_step']:.2f} ms/step; "
                f"{compiled['rewinds_in_check_run']} rewinds afterwards changed the dynamo counters by "
                f"{compiled['dynamo_stat_changes_after_rewinds']} (no recompiles)."
            )
        exact = data.get("exactness_bf16")
        if exact:
            parts = [
                f"{k} cache max |Δ| {v['max_abs_diff']:.3g} (logits up to {v['logit_scale']:.3g})"
                for k, v in exact.items()
            ]
            extra.append(
                f"- {path.stem}: bf16 recorded logits vs a fresh forward, batch 4 with rewinds: "
                + "; ".join(parts)
                + "."
            )
    return [*lines, "", *extra, ""]


def write_report(out_dir: Path, results_md: Path | None = None) -> Path:
    """Write RESULTS.md (default: next to ``out_dir``) and the plots; return the RESULTS.md path."""
    out_dir = Path(out_dir)
    target = results_md if results_md is not None else out_dir.parent / "RESULTS.md"
    target.write_text(build_markdown(out_dir))
    print(f"[report] wrote {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate RESULTS.md and the plots from the result files.")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder")
    args = parser.parse_args(argv)
    write_report(Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
