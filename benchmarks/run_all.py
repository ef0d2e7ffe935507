"""Regenerate every benchmark result, the plots and ``benchmarks/RESULTS.md`` with one command.

``python benchmarks/run_all.py`` runs the speed benchmark, then the quality benchmark, then writes the report.
``--smoke`` does the same in seconds into a temporary folder (never touching ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, quality, quality_chat, report, speed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run of both benchmarks")
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--skip-speed", action="store_true", help="keep the existing speed results")
    parser.add_argument("--skip-quality", action="store_true", help="keep the existing quality results")
    parser.add_argument("--skip-chat", action="store_true", help="keep the existing chat quality results (SmolLM2)")
    args = parser.parse_args(argv)
    out_dir = common.out_dir(args.out, args.smoke)
    extra = ["--smoke"] if args.smoke else []
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/run_all.py", *given])
    common_args = [*extra, "--out", str(out_dir), "--no-report", "--recorded-command", command]
    if not args.skip_speed:
        speed.main(common_args)
    if not args.skip_quality:
        quality.main(common_args)
    if not args.skip_chat:
        quality_chat.main(common_args)
    report.write_report(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
