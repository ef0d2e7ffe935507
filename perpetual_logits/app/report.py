"""The "why models stop" report: runs, statistics, trend, figures, JSON and markdown (the demo is :mod:`.demo`).

Everything here is library code: it raises ``ValueError`` for bad input and prints nothing; the command
line (:mod:`perpetual_logits.cli`) adds progress bars and turns errors into exit codes.

Example:

```python
>>> from perpetual_logits.app.report import trend_sentences
>>> trend = {"runs_compared": 0, "final_blocks": 4, "block_size": 25}
>>> trend_sentences(trend)[0][:46]
'No run that ended with EOS had 4 full blocks o'

```
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import _validation
from ..analysis.steps import StepStats, aligned_means, blockwise, eos_window, step_stats
from .methods import MethodSettings
from .running import LoadedModel, RunResult, run_method

__all__ = [
    "Analysis",
    "analysis_from_runs",
    "analyze_runs",
    "end_trend",
    "finite",
    "output_dir",
    "read_prompts",
    "trend_sentences",
    "write_analysis",
]


def output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written in it.

    Called before any run, so that a bad ``--out`` fails in a second rather than after minutes of work.

    Raises:
        ValueError: ``path`` is an existing file, cannot be created, or is not writable.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"cannot write into output folder {str(out)!r}: {reason}") from None
    return out


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"cannot read prompts file {str(path)!r}: {type(err).__name__}: {first[0] if first else ''}"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} has no non-empty line")
    return prompts


def finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats (the inf information content of a masked EOS) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def fmt(value: float, digits: int = 4) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


@dataclass
class Analysis:
    """Everything ``analyze`` computes; :func:`write_analysis` puts it on disk."""

    model: str
    eos: list[int]
    settings: MethodSettings
    block_size: int
    final_blocks: int
    runs: list[RunResult]
    stats: list[StepStats]
    window: list[Any]
    window_run: int | None
    trend: dict[str, Any]
    command: str
    chat: bool = False

    def ended(self) -> list[int]:
        return [i for i, r in enumerate(self.runs) if r.ended_with_eos]


def analyze_runs(
    loaded: LoadedModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: MethodSettings,
    block_size: int,
    final_blocks: int,
    command: str,
    chat: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> Analysis:
    """Baseline runs for every prompt × seed (the prompts of one seed as one batch), their per-step
    statistics and the end-aligned trend. ``progress(n)`` is called after each batch with its row count."""
    block_size = _validation.positive_int(block_size, "block_size")
    final_blocks = _validation.positive_int(final_blocks, "final_blocks", minimum=2)
    runs: list[RunResult] = []
    for seed in seeds:
        batch = run_method(loaded, "baseline", list(prompts), settings, seed, record_logits=True, chat=chat)
        runs.extend(batch)
        if progress is not None:
            progress(len(batch))
    return analysis_from_runs(loaded, runs, settings, block_size, final_blocks, command, chat=chat)


def analysis_from_runs(
    loaded: LoadedModel,
    runs: Sequence[RunResult],
    settings: MethodSettings,
    block_size: int,
    final_blocks: int,
    command: str,
    chat: bool = False,
) -> Analysis:
    """The analysis of baseline runs that kept their logits (``run_method(..., record_logits=True)``).

    The logits are dropped from the runs afterwards: the statistics are kept, the (steps, vocab) tensors
    are not needed any more.
    """
    stats: list[StepStats] = []
    for run in runs:
        if run.logits is None:
            raise ValueError("every run must keep its logits (run_method(..., record_logits=True))")
        # Steps up to and including the one that produced EOS; the model's raw distribution.
        stats.append(step_stats(run.logits, loaded.eos, lengths=[run.steps])[0])
    ended = [i for i, r in enumerate(runs) if r.ended_with_eos]
    window: list[Any] = []
    window_run = ended[0] if ended else None
    if window_run is not None:
        logits = runs[window_run].logits
        assert logits is not None
        window = eos_window(logits, loaded.tokenizer, k=10, last=5, length=len(stats[window_run]))
    trend = end_trend([stats[i] for i in ended], block_size, final_blocks)
    for run in runs:
        run.logits = None
    return Analysis(
        loaded.name,
        loaded.eos,
        settings,
        block_size,
        final_blocks,
        list(runs),
        stats,
        window,
        window_run,
        trend,
        command,
        chat,
    )


def end_trend(stats: Sequence[StepStats], block_size: int, final_blocks: int) -> dict[str, Any]:
    """Compare the last ``final_blocks`` blocks of runs that ended with EOS, lined up at their end.

    Blocks are counted back from the step that produced EOS (``blockwise(..., from_end=True)``), so block -1
    of every run is its final ``block_size`` steps, EOS step included. Only runs with at least
    ``final_blocks`` full blocks take part, so every block mean averages the same runs.
    """
    eligible = [s for s in stats if len(s) >= final_blocks * block_size]
    result: dict[str, Any] = {
        "runs_ended_with_eos": len(stats),
        "runs_compared": len(eligible),
        "final_blocks": final_blocks,
        "block_size": block_size,
        "blocks": list(range(-final_blocks, 0)),
    }
    if not eligible:
        return result
    tails = [blockwise(s[-final_blocks * block_size :], block_size) for s in eligible]
    for name in ("eos_prob", "info", "entropy", "varentropy"):
        result[name] = aligned_means([getattr(t, name) for t in tails])
    first, last = 0, final_blocks - 1
    result["runs_eos_prob_up"] = sum(t.eos_prob[last] > t.eos_prob[first] for t in tails)
    result["runs_entropy_down"] = sum(t.entropy[last] < t.entropy[first] for t in tails)
    # The step that sampled EOS is where EOS was likely by selection; the final block without it shows
    # whether the rise starts before that step.
    without = [blockwise(s[-block_size:-1], block_size) for s in eligible] if block_size > 1 else []
    if without:
        result["final_block_without_eos_step"] = {
            name: aligned_means([getattr(w, name) for w in without])[0] for name in ("eos_prob", "entropy")
        }
    return result


def trend_sentences(trend: dict[str, Any]) -> list[str]:
    n, k = trend["runs_compared"], trend["final_blocks"]
    if not n:
        return [
            f"No run that ended with EOS had {k} full blocks of {trend['block_size']} tokens, so the final "
            "blocks are not compared; use a smaller --block-size or more runs."
        ]
    p0, p1 = trend["eos_prob"][0], trend["eos_prob"][-1]
    h0, h1 = trend["entropy"][0], trend["entropy"][-1]
    rises = p1 > p0
    falls = h1 < h0
    ratio = f" (×{p1 / p0:.3g})" if p0 > 0 else ""
    lines = [
        f"- **EOS probability {'rises' if rises else 'does not rise'}** over the final {k} blocks: "
        f"{fmt(p0)} in block -{k} → {fmt(p1)} in block -1{ratio}; higher in the final block than in "
        f"block -{k} in {trend['runs_eos_prob_up']} of {n} runs.",
        f"- **Entropy {'falls' if falls else 'does not fall'}**: {h0:.3f} bits in block -{k} → {h1:.3f} "
        f"bits in block -1 ({h1 - h0:+.3f} bits); lower in the final block in {trend['runs_entropy_down']} "
        f"of {n} runs.",
    ]
    without = trend.get("final_block_without_eos_step")
    if without:
        lines.append(
            f"- The final block includes the step that sampled EOS, where EOS is likely by selection. "
            f"Without that step the final block has EOS probability {fmt(without['eos_prob'])} and entropy "
            f"{without['entropy']:.3f} bits."
        )
    return lines


def _write_figures(
    analysis: Analysis, out: Path, prefix: str, figure_stats: list[StepStats], ended: list[int]
) -> dict[str, Path]:
    from ..analysis.plotting import plot_blockwise, plot_eos_window

    paths: dict[str, Path] = {}
    which = "runs that ended with EOS" if ended else "runs (none ended with EOS)"
    paths["blockwise"] = plot_blockwise(
        figure_stats,
        out / f"{prefix}blockwise.png",
        block_size=analysis.block_size,
        title=f"Block-wise statistics, {len(figure_stats)} {which} — {Path(analysis.model).name}",
    )
    paths["blockwise_end"] = plot_blockwise(
        figure_stats,
        out / f"{prefix}blockwise_end.png",
        block_size=analysis.block_size,
        align="end",
        title=f"The same runs lined up at EOS — {Path(analysis.model).name}",
    )
    if analysis.window and analysis.window_run is not None:
        run = analysis.runs[analysis.window_run]
        paths["eos_window"] = plot_eos_window(
            analysis.window,
            out / f"{prefix}eos_window.png",
            highlight=set(analysis.eos),
            title=f"Top-10 next tokens before EOS — prompt {run.prompt!r}, seed {run.seed}",
        )

    return paths


def write_analysis(analysis: Analysis, out: Path, prefix: str = "") -> tuple[dict[str, Path], list[str]]:
    """Write the figures (PNG), ``analysis.json`` and ``analysis.md`` into ``out``; return their paths and
    notes for the user.

    Without matplotlib (the ``plot`` extra) the figures are skipped with a one-line note.
    """
    out = output_dir(out)
    notes: list[str] = []
    ended = analysis.ended()
    paths: dict[str, Path] = {}
    figure_stats = [analysis.stats[i] for i in ended] or analysis.stats
    try:
        paths.update(_write_figures(analysis, out, prefix, figure_stats, ended))
    except ImportError as err:  # matplotlib is the optional `plot` extra: write everything else
        notes.append(f"figures skipped ({err})")

    lengths = [analysis.runs[i].new_tokens for i in ended]
    payload = {
        "model": analysis.model,
        "command": analysis.command,
        "units": {"eos_prob": "probability", "info": "bits", "entropy": "bits", "varentropy": "bits^2"},
        "settings": asdict(analysis.settings),
        "chat_template": analysis.chat,
        "block_size": analysis.block_size,
        "distribution": "raw model logits (output_logits): temperature 1, no top-k/top-p",
        "runs": [
            {
                "prompt": r.prompt,
                "seed": r.seed,
                "new_tokens": r.new_tokens,
                "ended_with_eos": r.ended_with_eos,
                "text": r.text,
                "stats": s.to_dict(),
                "blocks": blockwise(s, analysis.block_size).to_dict(),
                "blocks_from_end": blockwise(s, analysis.block_size, from_end=True).to_dict(),
            }
            for r, s in zip(analysis.runs, analysis.stats, strict=True)
        ],
        "mean_blocks": {
            name: aligned_means([getattr(blockwise(s, analysis.block_size), name) for s in figure_stats])
            for name in ("eos_prob", "info", "entropy", "varentropy")
        },
        "eos_window": {
            "run": analysis.window_run,
            "steps": [w.to_dict() for w in analysis.window],
        },
        "final_blocks": analysis.trend,
    }
    paths["json"] = out / f"{prefix}analysis.json"
    paths["json"].write_text(json.dumps(finite(payload), indent=1) + "\n", encoding="utf-8")

    trend = analysis.trend
    md = [
        f"# Why the model stops: {analysis.model}",
        "",
        f"Command: `{analysis.command}`",
        "",
        f"{len(analysis.runs)} sampled baseline runs; {len(ended)} ended with EOS within "
        f"{analysis.settings.max_new_tokens} new tokens"
        + (f" (median length {statistics.median(lengths):.0f} tokens)." if lengths else "."),
        "Statistics are those of the model's raw next-token distribution at every step (temperature 1, "
        "nothing masked), in bits.",
        "",
        f"## The final {trend['final_blocks']} blocks before EOS",
        "",
        f"Runs are lined up at their end: blocks of {analysis.block_size} tokens are counted back from the "
        f"step that produced EOS, so block -1 is each run's last {analysis.block_size} steps (EOS step "
        f"included). Only runs with at least {trend['final_blocks']} full blocks are compared "
        f"({trend['runs_compared']} of {trend['runs_ended_with_eos']} that ended with EOS), so each block "
        "averages the same runs.",
        "",
        *trend_sentences(trend),
        "",
    ]
    if trend["runs_compared"]:
        md += [
            "| block | EOS probability | EOS information (bits) | entropy (bits) | varentropy (bits²) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i, block in enumerate(trend["blocks"]):
            md.append(
                f"| {block} | {fmt(trend['eos_prob'][i])} | {fmt(trend['info'][i], 2)} | "
                f"{trend['entropy'][i]:.3f} | {trend['varentropy'][i]:.3f} |"
            )
        md.append("")
    md += ["## Figures", ""]
    for key, label in (
        ("blockwise", "Blocks counted from the start (the blog's figure 1)"),
        ("blockwise_end", "Blocks counted back from EOS"),
        ("eos_window", "Top-10 tokens at the last 5 steps before EOS (the blog's figures 2-3)"),
    ):
        if key in paths:
            md.append(f"![{label}]({paths[key].name})")
            md.append("")
    paths["markdown"] = out / f"{prefix}analysis.md"
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    return paths, notes
