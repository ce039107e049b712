"""kasa-compare: the paper's comparison tables from finished runs (their saved files only).

    kasa-compare runs/sweeps/mrpc/... runs/sweeps/cola/... --metric-scale 100 [--out DIR] [--plots]
        table 1 style comparison: comparison.md, comparison.csv, comparison.tex (see kasa.analysis.compare)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from kasa.cli.common import folder_argument, run_reporting_errors
from kasa.cli.parser import ArgumentParser


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="kasa-compare", allow_abbrev=False,  # a flag's prefix (--metric) is unknown, not that flag
        description="A paper-style comparison table from finished runs: rows = methods (with trainable adapter "
        "parameters), columns = tasks, cells = median over seeds of the best validation score, best in bold, an "
        "average column. Written as comparison.md, comparison.csv and comparison.tex.",
    )
    parser.add_argument("dirs", nargs="+", type=folder_argument, help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the one directory given, else the current folder)")
    parser.add_argument("--metric-scale", type=float, default=1.0,
                        help="multiply the scores, e.g. 100 for percentages as in the paper (default 1); E2E's NIST "
                             "and CIDEr and the LLM judge's 1-10 score, not fractions, stay as they are, as in tables "
                             "12 and 2")
    parser.add_argument("--decimals", type=int, default=None,
                        help="decimals printed (default: 1 with --metric-scale 100, else 4)")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="also tell rows apart by this setting (a summary key such as beta, or a config key "
                        "such as method.truncation_rank); repeatable")
    parser.add_argument("--all-metrics", action="store_true",
                        help="a column per metric of each run's best epoch (E2E's BLEU, NIST, METEOR, ROUGE-L and "
                        "CIDEr as in table 12; each commonsense set as in table 3) instead of the main metric alone")
    parser.add_argument("--plots", action="store_true",
                        help="also draw the sweep plots the runs support (ablation, rank, truncation) into --out")
    args = parser.parse_args(argv)
    if not args.metric_scale > 0:
        parser.error(f"--metric-scale must be > 0 (e.g. 100 for percentages), got {args.metric_scale}")
    if args.decimals is not None and args.decimals < 0:
        parser.error(f"--decimals must be >= 0, got {args.decimals}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from kasa.analysis.compare import compare, to_markdown

    table, files = run_reporting_errors(
        lambda: compare(args.dirs, args.out, args.metric_scale, args.decimals, args.by, args.all_metrics),
        output_option="--out <folder>")
    print(to_markdown(table, args.dirs), end="")
    written = list(files.values())
    if args.plots:
        from kasa.analysis.plots import plot_sweep, written_files

        out = files["markdown"].parent
        done = run_reporting_errors(lambda: plot_sweep(args.dirs, out, args.metric_scale),
                                    output_option="--out <folder>")
        written += written_files(done)
        if not done:
            print("\nno plot: the runs hold no ablation (an intermediate rung of the ladder), no method at two ranks "
                  "and no truncating method at two truncation ranks")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
