"""Figures of the blog's motivating experiments, written as PNG files.

matplotlib is an optional dependency (the ``plot`` extra): it is imported only when a figure is drawn, with
the non-interactive Agg backend, so these functions work on servers and in CI. Units follow
:mod:`perpetual_logits.analysis`: bits for information content and entropy, bits² for varentropy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from .. import _validation
from .steps import StepStats, WindowStep, aligned_means, blockwise

__all__ = ["plot_blockwise", "plot_eos_window"]

_PANELS = (
    ("eos_prob", "EOS probability", "probability"),
    ("info", "EOS information content", "bits"),
    ("entropy", "Entropy", "bits"),
    ("varentropy", "Varentropy", "bits²"),
)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or an ImportError that names the extra to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("perpetual_logits figures need matplotlib: pip install 'perpetual-logits[plot]'") from err
    # Agg writes files without a display; switching only if pyplot is not in use yet keeps notebooks intact.
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_path(path: str | Path) -> Path:
    if not isinstance(path, (str, Path)) or str(path) == "":
        raise ValueError(f"`path` must be a non-empty str or Path, got {path!r}")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"`path` must end in .png (figures are written as PNG), got {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def plot_blockwise(
    stats: StepStats | Sequence[StepStats],
    path: str | Path,
    block_size: int = 25,
    align: str = "start",
    title: str | None = None,
    min_runs: int | None = None,
) -> Path:
    """The blog's figure 1: EOS probability, EOS information content, entropy and varentropy per block.

    Each run's per-step statistics are averaged over blocks of ``block_size`` steps (:func:`blockwise`);
    every run is drawn as a thin line and the mean over the runs that reach a block as a thick one, for the
    blocks that at least ``min_runs`` runs reach (a mean of one or two long runs is noise). Non-finite block
    means (information content of an EOS that was masked) are left out of the mean.

    Args:
        stats (`StepStats` or `list[StepStats]`): per-step statistics of one run or of several.
        path (`str` or `Path`): the PNG file to write (folders are created).
        block_size (`int`, defaults to 25): steps per block, >= 1.
        align (`str`, defaults to `"start"`): ``"start"`` counts blocks from the first generated token (the
            blog's figure); ``"end"`` counts them back from the last step, so runs of different lengths line
            up at EOS (x = blocks before the end, -1 = the final block).
        title (`str`, *optional*): figure title.
        min_runs (`int`, *optional*): runs a block needs for its mean to be drawn, >= 1; defaults to a fifth
            of the runs (at least 1).

    Returns:
        `Path`: the file written.

    Example:

    ```python
    >>> import tempfile, pathlib
    >>> from perpetual_logits.analysis import StepStats
    >>> from perpetual_logits.analysis.plotting import plot_blockwise
    >>> run = StepStats(eos_prob=[0.01, 0.1, 0.5], info=[6.6, 3.3, 1.0], entropy=[3.0, 2.0, 1.0],
    ...                 varentropy=[2.0, 1.0, 0.5])
    >>> out = plot_blockwise(run, pathlib.Path(tempfile.mkdtemp()) / "blocks.png", block_size=1)
    >>> out.stat().st_size > 0
    True

    ```
    """
    runs = [stats] if isinstance(stats, StepStats) else list(stats)
    if not runs or not all(isinstance(r, StepStats) for r in runs):
        raise ValueError("`stats` must be a StepStats or a non-empty list of StepStats")
    if align not in ("start", "end"):
        raise ValueError(f"`align` must be 'start' or 'end', got {align!r}")
    if min_runs is None:
        min_runs = max(1, math.ceil(len(runs) / 5))
    min_runs = _validation.positive_int(min_runs, "min_runs")
    out = _check_path(path)
    from_end = align == "end"
    blocks = [blockwise(r, block_size, from_end=from_end) for r in runs]
    plt = _pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (name, label, unit) in zip(axes.flat, _PANELS, strict=True):
        per_run = [getattr(b, name) for b in blocks]
        for values in per_run:
            # A marker too, so that a run of a single block still shows.
            ax.plot(
                _xs(len(values), from_end), values, color="tab:blue", alpha=0.2, linewidth=0.8, marker=".", markersize=2
            )
        mean = aligned_means(per_run, from_end)
        reached = [sum(_reaches(v, i, len(mean), from_end) for v in per_run) for i in range(len(mean))]
        # Blocks reached by too few runs are left blank: their "mean" is one or two long runs.
        mean = [m if n >= min_runs else math.nan for m, n in zip(mean, reached, strict=True)]
        label_mean = "mean over runs" + (f" (blocks reached by ≥ {min_runs} runs)" if min_runs > 1 else "")
        ax.plot(
            _xs(len(mean), from_end),
            mean,
            color="tab:red",
            linewidth=2.2,
            marker="o",
            markersize=3.5,
            label=label_mean,
        )
        ax.set_title(f"{label} per block")
        ax.set_ylabel(f"{label} ({unit})" if unit != "probability" else label)
        ax.set_xlabel(
            f"blocks before EOS ({block_size} tokens each; -1 = final block)"
            if from_end
            else f"block ({block_size} tokens each)"
        )
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes.flat[0].legend(loc="best", fontsize="small")
    n = len(runs)
    fig.suptitle(title or f"Block-wise statistics before EOS ({n} run{'s' if n != 1 else ''}, bits)")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _xs(count: int, from_end: bool) -> list[int]:
    return list(range(-count, 0)) if from_end else list(range(1, count + 1))


def _reaches(values: list[float], i: int, longest: int, from_end: bool) -> bool:
    """Whether a run has block ``i`` of ``longest``, counted from the aligned side."""
    return longest - i <= len(values) if from_end else i < len(values)


def plot_eos_window(
    window: Sequence[WindowStep],
    path: str | Path,
    highlight: Collection[int] | None = None,
    title: str | None = None,
) -> Path:
    r"""The blog's figures 2 and 3: one bar chart of the top-k tokens per step before EOS.

    Token labels come from :func:`eos_window` (newline shown as ``\n``); bars of the ids in ``highlight``
    (the EOS ids) are drawn in red so the competition between EOS and its rivals stands out.

    Args:
        window (`list[WindowStep]`): from :func:`eos_window`, oldest step first.
        path (`str` or `Path`): the PNG file to write (folders are created).
        highlight (`Collection[int]`, *optional*): token ids to colour, usually the EOS ids.
        title (`str`, *optional*): figure title.

    Returns:
        `Path`: the file written.

    Example:

    ```python
    >>> import tempfile, pathlib
    >>> from perpetual_logits.analysis import WindowStep
    >>> from perpetual_logits.analysis.plotting import plot_eos_window
    >>> window = [WindowStep(step=7, offset=-1, token_ids=[2, 3], tokens=["<eos>", "\\n"], probs=[0.6, 0.3])]
    >>> out = plot_eos_window(window, pathlib.Path(tempfile.mkdtemp()) / "window.png", highlight={2})
    >>> out.stat().st_size > 0
    True

    ```
    """
    steps = list(window)
    if not steps or not all(isinstance(w, WindowStep) for w in steps):
        raise ValueError("`window` must be a non-empty list of WindowStep (from eos_window)")
    marked = set() if highlight is None else {int(i) for i in highlight}
    out = _check_path(path)
    plt = _pyplot()
    from matplotlib import ticker

    k = max(len(w.tokens) for w in steps)
    top = max(max(w.probs, default=0.0) for w in steps)
    fig, axes = plt.subplots(
        1,
        len(steps),
        figsize=(2.9 * len(steps) + 1.0, 0.32 * k + 1.9),
        squeeze=False,
        constrained_layout=True,
    )
    for ax, w in zip(axes[0], steps, strict=True):
        ys = list(range(len(w.tokens)))
        colors = ["tab:red" if t in marked else "tab:blue" for t in w.token_ids]
        bars = ax.barh(ys, w.probs, color=colors)
        ax.bar_label(bars, labels=[_prob_text(p) for p in w.probs], padding=2, fontsize=7.5)
        ax.set_yticks(ys, [_short(t) for t in w.tokens], fontfamily="monospace", fontsize=8.5)
        ax.invert_yaxis()  # most probable on top
        ax.set_xlim(0.0, top * 1.3 if top > 0 else 1.0)  # room for the value labels
        # Ticks only up to the largest probability: a tick at 1.2 would suggest impossible values.
        ax.set_xticks([t for t in ticker.MaxNLocator(4).tick_values(0.0, top or 1.0) if t <= (top or 1.0) * 1.05])
        ax.set_xlabel("probability")
        where = "last step" if w.offset == -1 else f"{-w.offset - 1} before last"
        ax.set_title(f"step {w.step} ({where})", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title or f"Top-{k} next tokens at the last {len(steps)} steps before EOS")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _prob_text(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"


def _short(label: str, width: int = 14) -> str:
    """Cut long labels so that neighbouring panels never overlap."""
    return label if len(label) <= width else label[: width - 1] + "…"
