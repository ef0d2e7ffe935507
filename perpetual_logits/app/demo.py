"""The demo: every method on the same prompts and seeds, side by side, with the analysis of the baseline runs.

Library code like :mod:`perpetual_logits.app.report`: it raises ``ValueError`` for bad input and prints nothing;
the command line (``perpetual-logits demo``) adds progress and exit codes.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import _validation
from .methods import METHODS, MethodSettings
from .report import Analysis, analysis_from_runs, analyze_runs, finite, output_dir, trend_sentences, write_analysis
from .running import LoadedModel, RunResult, run_method

__all__ = ["DEFAULT_CHAT_PROMPTS", "DemoReport", "demo_summary", "demo_table", "run_demo", "write_demo"]


#: Prompts of the demo on a chat model: one asks for an explanation, one for a poem, one for advice.
DEFAULT_CHAT_PROMPTS = (
    "Explain how rainbows form.",
    "Write a short poem about autumn.",
    "Give me three tips for learning to cook.",
)


@dataclass
class DemoReport:
    """Every method's runs on the same prompts and seeds, and the analysis of baseline runs."""

    model: str
    prompts: list[str]
    seeds: list[int]
    settings: MethodSettings
    chat: bool
    command: str
    results: dict[str, list[RunResult]]
    analysis: Analysis


def run_demo(
    loaded: LoadedModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: MethodSettings,
    command: str,
    chat: bool = False,
    analysis_runs: int = 0,
    block_size: int = 25,
    progress: Callable[[int], Any] | None = None,
) -> DemoReport:
    """Every method of :data:`~perpetual_logits.app.methods.METHODS` on ``prompts`` (one batch) for each seed.

    The figures come from ``analysis_runs`` extra baseline runs per prompt, or, with 0, from the demo's own
    baseline runs (cheapest on a slow model). ``progress(n)`` is called after each batch.
    """
    analysis_runs = _validation.positive_int(analysis_runs, "analysis_runs", minimum=0)
    results: dict[str, list[RunResult]] = {name: [] for name in METHODS}
    for name in METHODS:
        for seed in seeds:
            record = name == "baseline" and analysis_runs == 0
            batch = run_method(loaded, name, list(prompts), settings, seed, record_logits=record, chat=chat)
            results[name].extend(batch)
            if progress is not None:
                progress(len(batch))
    figure_settings = MethodSettings(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
    )
    if analysis_runs:
        first = max(seeds) + 1 if seeds else 0
        analysis = analyze_runs(
            loaded,
            list(prompts),
            list(range(first, first + analysis_runs)),
            figure_settings,
            block_size,
            4,
            command,
            chat=chat,
            progress=progress,
        )
    else:
        analysis = analysis_from_runs(loaded, results["baseline"], figure_settings, block_size, 4, command, chat)
    return DemoReport(loaded.name, list(prompts), list(seeds), settings, chat, command, results, analysis)


def demo_table(report: DemoReport) -> tuple[list[str], list[dict[str, Any]]]:
    """The demo's markdown table (lines) and its rows as dicts."""
    from ..analysis.metrics import count_end_markers, rep_n

    header = (
        "| method | new tokens (mean) | stopped at EOS | EOS interventions (mean) "
        "| spelled end markers (mean) | rep-4 | tokens/s |"
    )
    rows = [header, "|---|---:|---:|---|---:|---:|---:|"]
    table: list[dict[str, Any]] = []
    for name, method in METHODS.items():
        runs = report.results[name]
        tokens = [r.new_tokens for r in runs]
        # The rows of a batch share one generate() call (one per seed): count its time once.
        seconds = {r.seed: r.seconds for r in runs}.values()
        entry = {
            "method": name,
            "description": method.description,
            "new_tokens": statistics.fmean(tokens),
            "stopped_at_eos": sum(r.ended_with_eos for r in runs),
            "intervention_kind": method.intervention,
            "interventions": statistics.fmean(len(r.interventions) for r in runs),
            "end_markers": statistics.fmean(count_end_markers(r.text) for r in runs),
            "rep_4": statistics.fmean(rep_n(r.token_ids, 4) for r in runs),
            "tokens_per_second": sum(tokens) / max(sum(seconds), 1e-9),
        }
        table.append(entry)
        kind = "–" if method.intervention == "none" else f"{entry['interventions']:.1f} {method.intervention}"
        rows.append(
            f"| {name} | {entry['new_tokens']:.0f} | {entry['stopped_at_eos']}/{len(runs)} | {kind} | "
            f"{entry['end_markers']:.1f} | {entry['rep_4']:.3f} | {entry['tokens_per_second']:.0f} |"
        )
    return rows, table


def _full_text(run: RunResult, chat: bool) -> str:
    # A chat answer is not a continuation of the user's words: show it on its own line.
    return f"{run.prompt}\n{run.text}" if chat else run.prompt + run.text


def write_demo(report: DemoReport, out: str | os.PathLike[str]) -> tuple[dict[str, Path], list[str]]:
    """Write ``README.md``, ``results.json`` and the analysis (figures, JSON, markdown) into ``out``."""
    folder = output_dir(out)
    paths, notes = write_analysis(report.analysis, folder)
    rows, table = demo_table(report)
    settings = report.settings
    samples = []
    for name in METHODS:
        first = report.results[name][0]
        samples.append(f"### {name} (seed {first.seed})\n\n{_full_text(first, report.chat)}\n")
    prompts = ", ".join(repr(p) for p in report.prompts)
    readme = [
        f"# perpetual-logits demo: {report.model}",
        "",
        f"Command: `{report.command}`",
        "",
        f"Prompt(s) {prompts}{' (chat template)' if report.chat else ''}, {len(report.seeds)} seed(s) per "
        f"method, at most {settings.max_new_tokens} new tokens, temperature {settings.temperature}, top-k "
        f"{settings.top_k}, top-p {settings.top_p}; backstep removes {settings.n_remove} tokens; post-eos and "
        f"dynamic use a {settings.schedule} schedule from {settings.peak}x. 'EOS on top': steps where EOS was "
        "the most likely token (suppressed); rep-4: share of repeated 4-grams.",
        "",
        *rows,
        "",
        "## Why the model stops",
        "",
        *trend_sentences(report.analysis.trend),
        "",
        *(f"![{key}]({p.name})" for key, p in paths.items() if p.suffix == ".png"),
        "",
        "## Samples",
        "",
        *samples,
    ]
    paths["readme"] = folder / "README.md"
    paths["readme"].write_text("\n".join(readme), encoding="utf-8")
    payload = {
        "model": report.model,
        "prompts": report.prompts,
        "chat_template": report.chat,
        "settings": asdict(settings),
        "table": table,
        "runs": {name: [r.to_dict() for r in report.results[name]] for name in METHODS},
    }
    paths["results"] = folder / "results.json"
    paths["results"].write_text(json.dumps(finite(payload), indent=1) + "\n", encoding="utf-8")
    return paths, notes


def demo_summary(report: DemoReport, tail_chars: int = 400) -> str:
    """What the demo prints: the table, the end of each method's first sample, the trend sentences."""
    rows, _ = demo_table(report)
    lines = [*rows, ""]
    for name in METHODS:
        first = report.results[name][0]
        # The methods share a seed, so their texts agree up to the first EOS: show the ends, where they differ.
        text = _full_text(first, report.chat)
        tail = text if len(text) <= tail_chars else "… " + text[-tail_chars:].lstrip()
        lines.append(f"--- {name} (seed {first.seed}), last {tail_chars} characters ---\n{tail}\n")
    lines.extend(trend_sentences(report.analysis.trend))
    return "\n".join(lines)
