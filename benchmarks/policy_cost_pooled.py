"""Several runs of ``policy_cost.py`` taken together: what one run cannot settle on a machine that drifts.

One run of ``policy_cost.py`` interleaves its arms and reports, per arm, the ratio of medians to the reference
(``method4(10)``) and the median of the per-repeat paired ratios. On this shared 2-core VM the machine's speed
drifts by tens of percent within a run (a repeat's reference step 4.1-6.0 ms in one run) and the reference step
moves by a fifth or more between fresh processes, so runs of the very same code give ratios 0.05-0.07 apart. This script
reads the JSON files of several runs -- each its own process, made with the same settings -- and reports per arm
and batch size:

* each run's ratio of medians and median paired ratio, and how many runs are above the goal (<= 1.10, issue 21);
* the pooled median paired ratio: the median over every repeat of every run of that repeat's step over the
  reference's of the same repeat (the arms of a repeat run back to back, so the drift cancels; pooling over runs
  also averages out each process's own layout and neighbours);
* a 95 % interval for it from a two-level bootstrap (runs drawn with replacement, then repeats within each drawn
  run), with a fixed seed: the pooled ratio's uncertainty, counting the spread between processes, not only
  within one. Drawing at both levels counts the repeats' own spread a second time, so the interval errs on the wide
  side (a little, when runs differ more than repeats do).

    python benchmarks/policy_cost_pooled.py RUN1/policy_cost.json RUN2/policy_cost.json ...
    python benchmarks/policy_cost_pooled.py --out pooled.md RUN*/policy_cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REFERENCE = "dynamic"  # the arm every ratio is taken to (BackstepConfig.method4(10))
GOAL = 1.10
#: Settings that must be the same in every run pooled.
SETTINGS = ("tokens", "repeats", "phrases", "allow_rewinds", "model", "clock")


def load_runs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The runs' JSON, checked: at least two, made with the same settings, each with its per-repeat steps."""
    if len(paths) < 2:
        raise ValueError(f"`paths`: pooling needs at least two runs' policy_cost.json, got {len(paths)}")
    runs = [json.loads(Path(path).read_text()) for path in paths]
    first = runs[0]
    for path, run in zip(paths, runs):
        missing = [key for key in (*SETTINGS, "batches") if key not in run]
        if missing:
            raise ValueError(f"{path}: not a policy_cost.py result (no {', '.join(missing)})")
        differ = [key for key in SETTINGS if run[key] != first[key]]
        if differ:
            raise ValueError(
                f"{path}: made with other settings than {paths[0]} ({', '.join(differ)}): pool runs of one setting"
            )
        for batch, arms in run["batches"].items():
            if REFERENCE not in arms or any(
                "ms_per_step_by_repeat" not in arm for name, arm in arms.items() if not name.startswith("_")
            ):
                raise ValueError(f"{path}: batch {batch} lacks the reference arm or the per-repeat steps")
    return runs


def paired_ratios(arms: dict[str, Any], name: str) -> list[float]:
    """Per repeat: the arm's step over the reference's step of the same repeat."""
    own = arms[name]["ms_per_step_by_repeat"]
    reference = arms[REFERENCE]["ms_per_step_by_repeat"]
    return [a / b for a, b in zip(own, reference)]


def bootstrap_interval(
    groups: Sequence[Sequence[float]], draws: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """A two-level bootstrap interval of the median of the pooled values: each draw takes as many groups as there
    are, with replacement, and within each taken group as many values as it holds, with replacement.

    Args:
        groups: the values of each run (non-empty).
        draws: bootstrap draws.
        seed: the random seed (the interval is reproducible).
        level: the interval's coverage.

    Example:

    ```python
    >>> bootstrap_interval([[1.05, 1.05], [1.05]])
    (1.05, 1.05)

    ```
    """
    if not groups or any(not group for group in groups):
        raise ValueError("`groups` must be non-empty lists of values")
    rng = random.Random(seed)
    medians = []
    for _ in range(draws):
        pooled: list[float] = []
        for group in rng.choices(groups, k=len(groups)):
            pooled += rng.choices(group, k=len(group))
        medians.append(statistics.median(pooled))
    medians.sort()
    tail = (1 - level) / 2
    low = medians[int(tail * (draws - 1))]
    high = medians[round((1 - tail) * (draws - 1))]
    return low, high


def pool(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per batch size and arm (the reference left out): each run's ratios, the pooled median paired ratio and its
    interval, and how many runs are above the goal by either statistic."""
    batches = [batch for batch in runs[0]["batches"] if all(batch in run["batches"] for run in runs)]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for batch in batches:
        names = [
            name
            for name in runs[0]["batches"][batch]
            if not name.startswith("_") and name != REFERENCE and all(name in run["batches"][batch] for run in runs)
        ]
        out[batch] = {}
        for name in names:
            groups = [paired_ratios(run["batches"][batch], name) for run in runs]
            of_medians = [run["batches"][batch][name]["ratio_of_medians"] for run in runs]
            paired_medians = [statistics.median(group) for group in groups]
            low, high = bootstrap_interval(groups)
            out[batch][name] = {
                "runs": len(runs),
                "ratio_of_medians_by_run": of_medians,
                "paired_median_by_run": paired_medians,
                "runs_above_goal_by_ratio_of_medians": sum(r > GOAL for r in of_medians),
                "runs_above_goal_by_paired_median": sum(r > GOAL for r in paired_medians),
                "pooled_paired_median": statistics.median([r for group in groups for r in group]),
                "interval_95": [low, high],
            }
    return out


def markdown(pooled: dict[str, dict[str, dict[str, Any]]], sources: Sequence[str]) -> str:
    lines = [
        f"Policy cost pooled over {len(sources)} runs (each its own process): ratios to `method4(10)`; goal <= "
        f"{GOAL:.2f}.",
        "",
        "| batch | arm | ratio of medians by run | above goal | median paired ratio by run | above goal "
        "| pooled median paired ratio [95 % interval] |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, arms in pooled.items():
        for name, r in arms.items():
            by_run = " / ".join(f"{x:.4f}" for x in r["ratio_of_medians_by_run"])
            paired = " / ".join(f"{x:.4f}" for x in r["paired_median_by_run"])
            low, high = r["interval_95"]
            lines.append(
                f"| {batch} | {name} | {by_run} | {r['runs_above_goal_by_ratio_of_medians']} of {r['runs']} | "
                f"{paired} | {r['runs_above_goal_by_paired_median']} of {r['runs']} | "
                f"{r['pooled_paired_median']:.4f} [{low:.4f}-{high:.4f}] |"
            )
    lines += ["", "Runs: " + ", ".join(sources) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="policy_cost.json files of separate runs")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except ValueError as error:
        parser.error(str(error))
    table = markdown(pool(runs), [str(path) for path in args.runs])
    if args.out is not None:
        args.out.write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
