"""Re-summarise a Hydra multirun directory (kasa-train writes the summary after every --multirun itself):

    python -m kasa.cli.sweep runs/sweeps/cola/2025-01-01_12-00-00

Median/min/max/std of the best score per setting over seeds (sweep_summary.md, sweep_summary.csv) and a beta x gamma
heatmap when either varies; a sweep over tasks gets one best median per task and metric and a heatmap panel per task,
each with its metric's colour bar; see kasa.analysis.sweep.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from kasa.cli.parser import ArgumentParser


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m kasa.cli.sweep", allow_abbrev=False,  # a flag's prefix (--metric) is unknown, not that flag
        description="Summarise a Hydra multirun directory: median/min/max/std of the best score per setting over "
        "seeds (sweep_summary.md, sweep_summary.csv) and a beta x gamma heatmap when either varies. A sweep over "
        "tasks gets one best median per task and metric, and a heatmap panel per task with its metric's colour bar.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    from kasa.analysis.sweep import summarize_sweep
    from kasa.cli.common import run_reporting_errors

    path = run_reporting_errors(lambda: summarize_sweep(args.sweep_dir), output_option="")
    print(path.read_text(), end="")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
