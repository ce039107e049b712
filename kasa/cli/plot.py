"""kasa-plot: the paper's figures from finished runs (their saved files only).

    kasa-plot runs/cola/kasa/2026-01-01_10-00-00_123456 [--layer 11] [--checkpoint best]
        one run: singular values per layer and position (figure 4), regularisation terms and loss (figure 11)
    kasa-plot runs/sweeps/ablation_mrpc/... [more sweeps] [--out DIR] [--metric-scale 100]
        runs of sweeps: ablation bars (figure 2), metric vs rank r (figure 3 / table 13), metric vs truncation
        rank k (figure 9), whichever the runs support; --kind picks plots explicitly
A beta x gamma sweep's figure (the paper's table 15) is the heatmap.png that the sweep's summary draws into its folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from kasa.cli.common import folder_argument, run_reporting_errors
from kasa.cli.parser import ArgumentParser
from kasa.run_dir import (
    ADAPTER_WEIGHTS_FILE,
    BEST_CHECKPOINT,
    CHECKPOINTS_DIR,
    LAST_CHECKPOINT,
    REGULARIZATION_FILE,
    SUMMARY_FILE,
    sweep_record,
)

RUN_KINDS = ("singular-values", "regularization")
SWEEP_KINDS = ("ablation", "rank", "truncation")


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (SUMMARY_FILE, REGULARIZATION_FILE, ADAPTER_WEIGHTS_FILE,
                                                   CHECKPOINTS_DIR))


def _heatmap_hint(dirs: Sequence[Path]) -> str:
    """Where a beta x gamma sweep's figure is, for the sweeps' folders among `dirs`: its heatmap.png, which the
    sweep's summary draws (kasa-plot draws the paper's other figures)."""
    from kasa.analysis.sweep import HEATMAP_FILE

    sweeps = [d for d in dirs if sweep_record(d) is not None or (d / HEATMAP_FILE).is_file()]
    heatmaps = [str(d / HEATMAP_FILE) for d in sweeps if (d / HEATMAP_FILE).is_file()]
    if heatmaps:
        return f"; a beta x gamma sweep's figure is the heatmap its summary drew: {', '.join(heatmaps)}"
    if sweeps:
        return (f"; a beta x gamma sweep's figure is the {HEATMAP_FILE} its summary draws when beta or gamma varies "
                f"(python -m kasa.cli.sweep {sweeps[0]} writes the summary again)")
    return ""


def _ablation_hint(runs: Sequence[Any]) -> str:
    """The bars of figure 2 for runs of several methods, none of them the ladder's middle rungs (which alone make the
    default draw them: a lora and kasa pair is as likely a rank sweep as an ablation)."""
    methods = sorted({str(run.summary.get("method")) for run in runs})
    if len(methods) < 2:
        return ""
    return f"; --kind ablation draws the runs' methods side by side ({', '.join(methods)})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="kasa-plot", allow_abbrev=False,  # a flag's prefix (--metric) is unknown, not that flag
        description="The paper's analysis plots (PNG + the plotted data as JSON) from saved run files. One run "
        "directory: singular values per layer and position (figure 4) and the regularisation terms with the loss "
        "(figure 11). Sweep directories: ablation bars (figure 2), metric vs rank r (figure 3), metric vs "
        "truncation rank k (figure 9), whichever the runs support. A beta x gamma sweep's heatmap is drawn by the "
        "sweep itself (heatmap.png in its folder; python -m kasa.cli.sweep <sweep dir> draws it again).",
    )
    parser.add_argument("dirs", nargs="+", type=folder_argument,
                        help="a run directory (or checkpoint), or sweep directories")
    parser.add_argument("--kind", action="append", choices=RUN_KINDS + SWEEP_KINDS, default=None,
                        help="draw only these plots (repeatable; default: all that apply)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the run or sweep directory; required for several sweeps)")
    parser.add_argument("--layer", type=int, default=None, help="figure 11's layer (default: the last)")
    parser.add_argument("--checkpoint", choices=(BEST_CHECKPOINT, LAST_CHECKPOINT),
                        help="figure 4's checkpoint in a run directory: best (default) or last")
    parser.add_argument("--metric-scale", type=float, default=1.0,
                        help="multiply the scores (e.g. 100); NIST, CIDEr and the LLM judge's 1-10 score, not "
                             "fractions, stay as they are")
    args = parser.parse_args(argv)
    if not args.metric_scale > 0:
        parser.error(f"--metric-scale must be > 0 (e.g. 100 for percentages), got {args.metric_scale}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from kasa.analysis import plots

    kinds = args.kind
    single = len(args.dirs) == 1 and _is_run_dir(args.dirs[0])
    if kinds is None:
        kinds = list(RUN_KINDS if single else SWEEP_KINDS)
        automatic = True
    else:
        automatic = False
    run_kinds = [k for k in kinds if k in RUN_KINDS]
    sweep_kinds = [k for k in kinds if k in SWEEP_KINDS]
    if run_kinds and len(args.dirs) != 1:
        print("error: singular-values and regularization plots take one run directory", file=sys.stderr)
        return 2

    if args.out is not None:
        from kasa.run_dir import output_folder

        run_reporting_errors(lambda: output_folder(args.out, create=False), output_option="--out <folder>")

    from kasa.analysis.compare import collect_runs

    runs: list[Any] = []  # the sweeps' runs, read once: each read warns of the folders it skips
    out = args.out if args.out is not None or len(args.dirs) > 1 else args.dirs[0]

    def draw() -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        if automatic and single:
            return plots.plot_run(args.dirs[0], args.layer, args.checkpoint, args.out)
        runs[:] = collect_runs(args.dirs)[0]
        if automatic:
            return plots.plot_sweep(runs, out, args.metric_scale) if runs else {}
        for kind in run_kinds:
            if kind == "singular-values":
                done[kind] = plots.singular_values(args.dirs[0], args.checkpoint, args.out)
            else:
                done[kind] = plots.regularization(args.dirs[0], args.layer, args.out)
        for kind in sweep_kinds:
            done[kind] = getattr(plots, kind)(runs, out, args.metric_scale)
        return done

    done = run_reporting_errors(draw, output_option="--out <folder>")
    if not done:
        hints = _ablation_hint(runs) + _heatmap_hint(args.dirs)
        print("error: nothing to plot: no KaSA checkpoint or regularization.jsonl (a run), or no ablation / rank / "
              f"truncation sweep among the runs (sweeps){hints}", file=sys.stderr)
        return 2
    for kind, data in done.items():
        print(f"{kind}: {data['png']}")
    if "rank" in done:
        print(f"rank table: {plots.written_files(done)[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
