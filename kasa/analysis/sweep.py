"""Summarise a Hydra multirun (e.g. `kasa-train -m recipe=... method.beta=1e-4,1e-3 method.gamma=1e-4,1e-3 seed=0,1,2`).

    python -m kasa.cli.sweep runs/sweeps/cola/2025-01-01_12-00-00   (kasa-train writes it after every multirun)

Every run of the sweep is a folder under the sweep directory holding the `summary.json` that training writes
(keys used: task, method, metric, best, seed, rank, beta, gamma and, when present, `overrides`, the run's Hydra
command-line overrides such as `trainer.lr=3e-4`). Runs without a (readable) summary, e.g. crashed jobs, are skipped
with a warning.

Runs are grouped into settings. A setting is identified by
  * method, rank, beta and gamma (from `summary.json`; always shown, beta and gamma left empty for methods whose
    loss has no such term), and
  * task, metric and recipe, and every key of the `overrides` lists, but only those whose value is not the same in
    all runs (`method.beta=...` and the like are already covered by the fields above and are not repeated, and
    settings that do not change what a run computes, such as `resume=auto`, never tell runs apart).
The seed is never part of a setting: the runs of a setting are its seeds. Per setting the summary gives the number of
runs, their seeds, and the median, minimum, maximum and sample standard deviation (ddof 1; empty for one run) of
`best`, the best-epoch validation score, the statistic the paper reports (median of 5 seeds). A sweep over tasks
(`task=glue/cola,glue/rte`) scores each task on its own metric (CoLA Matthews', RTE accuracy): the best median is
given per task and metric, never across them.

Written into the sweep directory: sweep_summary.md, sweep_summary.csv and, when beta or gamma takes more than one
value, heatmap.png (beta on the rows, gamma on the columns, the median annotated in each cell, like the paper's
Table 15; one panel per combination of the other setting values, e.g. per task, each panel with a colour scale of
its own when the panels' tasks or metrics differ) plus heatmap.json, the exact matrices plotted.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kasa.adapters.config import has_loss_weight, method_uses
from kasa.config import is_bookkeeping
from kasa.run_dir import EXPORT_INFO_FILE, HYDRA_DIR, SUMMARY_FILE, finite_numbers, holds_a_run, read_config, sweep_record

log = logging.getLogger(__name__)

MARKDOWN_FILE = "sweep_summary.md"
CSV_FILE = "sweep_summary.csv"
HEATMAP_FILE = "heatmap.png"
HEATMAP_DATA_FILE = "heatmap.json"

BASE_KEYS = ("method", "rank", "beta", "gamma")  # always part of the setting
LOSS_WEIGHT_KEYS = ("beta", "gamma")  # empty for the methods without the term (kasa.adapters.config.LOSS_WEIGHTS)
OPTIONAL_SUMMARY_KEYS = ("task", "metric", "recipe")  # part of the setting when they vary
SCORE_KEYS = ("task", "metric")  # what a median is a median of: medians are compared only within one of these
# Overrides that repeat a summary field (or are the seed) and so never add a column of their own.
OVERRIDE_ALIASES = {
    "seed",
    "method",
    "method.method",
    "method.rank",
    "method.beta",
    "method.gamma",
    "task",
    "task.name",
    "task.metric",
    "recipe",
}
STAT_COLUMNS = ("n", "seeds", "median", "min", "max", "std")


MISSING = object()


def config_value(node: Any, key: str, missing: Any = None) -> Any:
    """The value at dotted `key` in a config dict, else `missing`."""
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


@dataclass
class Run:
    """One finished run of the sweep: its folder, its summary and its parsed overrides."""

    path: Path
    summary: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The run's resolved config.json ({} when absent or unreadable)."""
        return read_config(self.path)

    def value(self, key: str) -> Any:
        """A setting value: summary fields for BASE_KEYS and OPTIONAL_SUMMARY_KEYS; for an override's key the value
        the run resolved it to (config.json: `trainer.lr=3e-3` and `trainer.lr=0.003`, or no override and the
        default, are the same setting), or the override's text for a config group (`model=minilm_l6`). beta and
        gamma are None (shown empty) for methods whose loss has no such term, and rank for those without one."""
        if key in BASE_KEYS and not method_uses(str(self.summary.get("method")), key):  # FFT's rank, LoRA's beta
            return None
        if key in BASE_KEYS or key in OPTIONAL_SUMMARY_KEYS:
            return self.summary.get(key)
        resolved = config_value(self.config, key, MISSING)
        return self.overrides.get(key) if resolved is MISSING or isinstance(resolved, dict) else resolved

    @property
    def params_without_head(self) -> int | None:
        """The paper's parameter count: what the method trains, the task head not included (summaries written
        before it got this name call it `trainable_params`)."""
        return self.summary.get("trainable_params_without_head", self.summary.get("trainable_params"))


@dataclass
class Grid:
    """One beta x gamma panel of the heatmap: median[i][j] belongs to beta[i], gamma[j] (NaN: no run), all medians of
    one task's `metric`."""

    title: str
    beta: list[float]
    gamma: list[float]
    median: np.ndarray
    task: str | None = None
    metric: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "task": self.task,
            "metric": self.metric,
            "beta": self.beta,
            "gamma": self.gamma,
            "median": finite_numbers(self.median.tolist()),
        }


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """`["trainer.lr=3e-4", "+x=1", "seed=2"]` -> {"trainer.lr": "3e-4", "x": "1", "seed": "2"}."""
    parsed: dict[str, str] = {}
    for item in overrides or []:
        text = str(item)
        if "=" not in text:
            continue  # deletions such as ~key carry no value
        key, value = text.split("=", 1)
        key = key.lstrip("+~").strip()
        if key.startswith("hydra.") or key == "hydra":
            continue
        parsed[key] = value.strip()
    return parsed


def _run_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder that looks like one job of the sweep: it holds summary.json or Hydra's .hydra/ folder, or it is a
    direct, non-hidden subfolder of the sweep (a job that crashed early), not a kasa-export folder; folders that
    contain other runs are not runs themselves. A run's own folder is that one run: its direct subfolders are not jobs that crashed."""
    if holds_a_run(sweep_dir):
        return [sweep_dir]
    candidates: set[Path] = set()
    candidates.update(p.parent for p in sweep_dir.rglob(SUMMARY_FILE))
    candidates.update(p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir())
    candidates.update(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    candidates.discard(sweep_dir)
    candidates = {p for p in candidates if not any(part.startswith(".") for part in p.relative_to(sweep_dir).parts)
                  and not (p / EXPORT_INFO_FILE).is_file()}  # a kasa-export folder put there is no job
    runs = {p for p in candidates if not any(q != p and p in q.parents for q in candidates)}
    return sorted(runs, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    """Sort 2 before 10."""
    key: list[Any] = []
    for part in path.parts:
        key.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return key


def load_runs(sweep_dir: Path) -> tuple[list[Run], list[Path]]:
    """The sweep's finished runs, and the run folders skipped (no summary.json, unreadable, or no finite `best`)."""
    runs: list[Run] = []
    skipped: list[Path] = []
    for directory in _run_dirs(sweep_dir):
        summary_path = directory / SUMMARY_FILE
        if not summary_path.is_file():
            log.warning("skipping %s: no %s (still training, stopped, or failed)", directory, SUMMARY_FILE)
            skipped.append(directory)
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as err:
            log.warning("skipping %s: cannot read %s (%s)", directory, SUMMARY_FILE, err)
            skipped.append(directory)
            continue
        best = summary.get("best") if isinstance(summary, dict) else None
        if not isinstance(best, (int, float)) or isinstance(best, bool) or not math.isfinite(float(best)):
            log.warning("skipping %s: %s has no best score (no evaluation gave a defined one)", directory, SUMMARY_FILE)
            skipped.append(directory)
            continue
        runs.append(Run(directory, summary, parse_overrides(summary.get("overrides") or [])))
    return runs, skipped


def setting_keys(runs: Sequence[Run]) -> list[str]:
    """The columns that identify a setting: BASE_KEYS, then the other keys whose value differs between runs."""
    keys = list(BASE_KEYS)
    for key in OPTIONAL_SUMMARY_KEYS:
        if len({hashable(run.summary.get(key)) for run in runs}) > 1:
            keys.append(key)
    override_keys = sorted({k for run in runs for k in run.overrides if not is_bookkeeping(k)}
                           - OVERRIDE_ALIASES - set(keys))
    for key in override_keys:
        if len({hashable(run.value(key)) for run in runs}) > 1:
            keys.append(key)
    return keys


def hashable(value: Any) -> Any:
    """A setting's value as a key: a list or mapping (target_modules) as its JSON."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _sort_key(value: Any) -> tuple[int, float, str]:
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, bool):
        return (1, 0.0, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def summarize(runs: Sequence[Run], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per setting (sorted by the setting values): the setting, n, seeds, median/min/max/std of `best`, and
    the task and metric the scores are of (SCORE_KEYS: setting columns only when they vary, always in the row)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(hashable(run.value(k)) for k in keys), []).append(run)
    rows = []
    for setting in sorted(groups, key=lambda s: [_sort_key(v) for v in s]):
        members = groups[setting]
        best = np.array([float(run.summary["best"]) for run in members])
        seeds = sorted((run.summary.get("seed") for run in members), key=_sort_key)
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1}, key=_sort_key)
        if repeated:  # as kasa-compare warns: not the spread over seeds that the row's n and std suggest
            log.warning("%s pools runs with the same seed %s: runs that differ only where the table shows no column "
                        "(beta or gamma under a method without that term, say), or repeated runs",
                        ", ".join(f"{k}={v}" for k, v in zip(keys, setting) if v is not None), repeated)
        row: dict[str, Any] = dict(zip(keys, setting))
        row.update(
            n=len(members),
            seeds=seeds,
            median=float(np.median(best)),
            min=float(best.min()),
            max=float(best.max()),
            std=float(np.std(best, ddof=1)) if len(best) > 1 else None,
        )
        for key in SCORE_KEYS:  # one value per setting: a key of it whenever the runs' values differ
            row.setdefault(key, members[0].summary.get(key))
        rows.append(row)
    return rows


def score_groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[Any, Any], list[dict[str, Any]]]:
    """The rows by (task, metric), sorted: the medians that can be compared with each other (a sweep over tasks
    holds one group per task, and tasks score different metrics: CoLA Matthews', RTE accuracy)."""
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in SCORE_KEYS), []).append(row)
    return {key: groups[key] for key in sorted(groups, key=lambda k: [_sort_key(v) for v in k])}


def score_label(task: Any, metric: Any) -> str:
    """`cola (matthews)`: what a group's medians are."""
    return f"{task or '?'} ({metric or '?'})"


def unfinished_loss_weights(skipped: Sequence[Path]) -> dict[str, set[float]]:
    """The beta and gamma values that the skipped runs (failed, stopped or still training) were set to, from their
    config.json, for the methods with those terms: the heatmap's rows and columns that they leave empty ('-')."""
    values: dict[str, set[float]] = {key: set() for key in LOSS_WEIGHT_KEYS}
    for directory in skipped:
        method = read_config(directory).get("method")
        for key in LOSS_WEIGHT_KEYS if isinstance(method, dict) else ():
            if has_loss_weight(str(method.get("method")), key) and isinstance(method.get(key), (int, float)):
                values[key].add(float(method[key]))
    return values


def heatmap_grids(rows: Sequence[dict[str, Any]], keys: Sequence[str],
                  unfinished: dict[str, set[float]] | None = None) -> list[Grid]:
    """The beta x gamma matrices of median `best` (one per combination of the other setting values that has a run
    with both terms), or [] when neither beta nor gamma varies (a sweep over one of them gives a single row or
    column). `unfinished` (unfinished_loss_weights) adds the values of runs without a result, as empty cells, so
    that a failed setting shows as '-' and not as a grid without it."""
    unfinished = unfinished or {}
    betas = sorted({row["beta"] for row in rows if row["beta"] is not None} | unfinished.get("beta", set()),
                   key=_sort_key)
    gammas = sorted({row["gamma"] for row in rows if row["gamma"] is not None} | unfinished.get("gamma", set()),
                    key=_sort_key)
    if len(betas) < 2 and len(gammas) < 2:
        return []
    others = [k for k in keys if k not in ("beta", "gamma")]
    varying = [k for k in others if len({row[k] for row in rows}) > 1]
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        panels.setdefault(tuple(row[k] for k in others), []).append(row)
    grids = []
    for other in sorted(panels, key=lambda s: [_sort_key(v) for v in s]):
        first = panels[other][0]  # the panel's rows share their task and metric (setting keys when they vary)
        matrix = np.full((len(betas), len(gammas)), np.nan)
        for row in panels[other]:
            if row["beta"] is None or row["gamma"] is None:
                continue
            matrix[betas.index(row["beta"]), gammas.index(row["gamma"])] = row["median"]
        if np.isnan(matrix).all():
            continue  # a method without beta or gamma terms (lora, kasa_l2's gamma): no beta x gamma panel
        values = dict(zip(others, other))
        shown = varying or [k for k in ("method", "rank") if k in values]
        title = ", ".join(f"{k}={_fmt(values[k])}" for k in shown)
        grids.append(Grid(title, [float(b) for b in betas], [float(g) for g in gammas], matrix,
                          first.get("task"), first.get("metric")))
    return grids


def plot_heatmap(grids: Sequence[Grid], path: Path) -> Path:
    """Draw `grids` side by side (Agg backend), the median annotated in each cell; NaN cells show '-'. Panels of one
    task and metric share one colour scale and bar; a sweep over tasks (or metrics) gives each panel its own scale
    and bar, labelled with its metric, since a CoLA Matthews' correlation and an RTE accuracy are not one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(grids)
    scores = {(grid.task, grid.metric) for grid in grids}
    shared = len(scores) == 1
    # Panel titles wrapped at their commas, a long value (a data_dir path) kept whole on a line of its own: each panel
    # is made wide enough for its longest line (~11 characters an inch), beside its labels and colour bar.
    titles = [textwrap.fill(grid.title, 36, break_long_words=False) for grid in grids]
    longest = max((len(line) for title in titles for line in title.splitlines()), default=0)
    width = max(4.0, 1.1 * len(grids[0].gamma) + 2.0, longest / 11 + 2.2) + (0.0 if shared else 1.0)
    height = max(3.0, 0.8 * len(grids[0].beta) + 1.5)
    # constrained layout keeps the title, the panels' titles and labels and the colour bars apart
    fig, axes = plt.subplots(1, n, figsize=(width * n + (1.0 if shared else 0.0), height + 0.6), squeeze=False,
                             layout="constrained")
    limits = {}
    for score in scores:
        finite = np.concatenate([g.median[np.isfinite(g.median)] for g in grids if (g.task, g.metric) == score])
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        pad = 0.05 * (abs(vmin) or 1.0)  # one value: a scale around it (not one of width 2e-6, ticked as offsets)
        limits[score] = (vmin - pad, vmax + pad) if vmin == vmax else (vmin, vmax)
    for ax, grid, title in zip(axes[0], grids, titles):
        vmin, vmax = limits[(grid.task, grid.metric)]
        image = ax.imshow(np.ma.masked_invalid(grid.median), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(grid.gamma)), [_fmt(g) for g in grid.gamma])
        ax.set_yticks(range(len(grid.beta)), [_fmt(b) for b in grid.beta])
        ax.set_xlabel("gamma (orthogonality, L3)")
        ax.set_ylabel("beta (singular values, L2)")
        if title:
            ax.set_title(title)
        for i in range(len(grid.beta)):
            for j in range(len(grid.gamma)):
                value = grid.median[i, j]
                if math.isnan(value):
                    ax.text(j, i, "-", ha="center", va="center", color="grey")
                    continue
                bright = (value - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, f"{value:.4f}", ha="center", va="center", color="black" if bright else "white")
        if not shared:
            fig.colorbar(image, ax=ax, label=f"median {grid.metric or 'best'}")
    if shared:
        task, metric = next(iter(scores))
        fig.colorbar(image, ax=list(axes[0]), label=f"median {metric or 'best'}")
        fig.suptitle(f"{task + ': ' if task else ''}median {metric or 'best'} over seeds")
    else:
        fig.suptitle("median best-epoch score over seeds (one colour scale per task and metric)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return " ".join(_fmt(v) for v in value)
    return str(value)


def _stat(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def write_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, *STAT_COLUMNS])
        for row in rows:
            writer.writerow(
                [*("" if row[k] is None else row[k] for k in keys), row["n"], _fmt(row["seeds"])]
                + ["" if row[c] is None else repr(row[c]) for c in ("median", "min", "max", "std")]
            )
    return path


def write_markdown(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], runs: Sequence[Run], skipped: Sequence[Path], sweep_dir: Path,
    heatmap: Path | None, path: Path,
) -> Path:
    groups = score_groups(rows)
    if len(groups) <= 1:
        task, metric = next(iter(groups), (None, None))
        scored = f"- task: {task or '?'}; metric: {metric or '?'} (`best` = best validation epoch)"
    else:  # medians of different tasks or metrics are not one scale: each group has its own best
        scored = (f"- tasks (metric): {', '.join(score_label(*group) for group in groups) or '?'} (`best` = best "
                  "validation epoch; medians are compared within a task and metric only)")
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        scored,
        f"- runs summarised: {len(runs)}; skipped (no usable {SUMMARY_FILE}): {len(skipped)}",
        "- statistics over the seeds of each setting; std is the sample standard deviation (ddof 1)",
    ]
    if skipped:
        lines.append(f"- folders skipped: {', '.join(f'`{p.relative_to(sweep_dir)}/`' for p in skipped)}")
    for group, members in groups.items():
        top = max(members, key=lambda r: r["median"])
        described = ", ".join(f"{k}={_fmt(top[k])}" for k in keys if len(groups) == 1 or k not in SCORE_KEYS)
        label = f", {score_label(*group)}" if len(groups) > 1 else ""
        lines.append(f"- best median{label}: {top['median']:.4f} ({described}; n={top['n']})")
    if heatmap is not None:
        lines.append(f"- beta x gamma heatmap: [{heatmap.name}]({heatmap.name})")
    lines += ["", "| " + " | ".join([*keys, *STAT_COLUMNS]) + " |", "|" + "---|" * (len(keys) + len(STAT_COLUMNS))]
    for row in rows:
        cells = [_fmt(row[k]) for k in keys] + [str(row["n"]), _fmt(row["seeds"])]
        cells += [_stat(row[c]) for c in ("median", "min", "max", "std")]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("")
        lines.append(f"No finished run (no {SUMMARY_FILE}) was found.")
    path.write_text("\n".join(lines) + "\n")
    return path


def check_sweep_folder(sweep_dir: Path) -> None:
    """Refuse, before anything is written, a folder that holds no sweep's runs: one run's folder (its summary would
    land among the run's files) or a folder with no run under it. A folder that Hydra or sweep_launch.py marked as a
    sweep is one, even when none of its jobs got far enough to leave a record."""
    if sweep_record(sweep_dir) is not None:
        return
    if holds_a_run(sweep_dir):
        raise ValueError(f"{sweep_dir} is one run's folder, not a sweep's: pass the sweep's folder (the one holding "
                         f"multirun.yaml), or tabulate runs with kasa-compare {sweep_dir}")
    if not any(holds_a_run(directory) for directory in _run_dirs(sweep_dir)):
        raise ValueError(f"{sweep_dir} holds no sweep's runs (no folder under it has {SUMMARY_FILE} or {HYDRA_DIR}/): "
                         "pass a sweep's folder (hydra.sweep.dir, the one holding multirun.yaml)")


def summarize_sweep(sweep_dir: Path) -> Path:
    """Write sweep_summary.md, sweep_summary.csv (and heatmap.png + heatmap.json when beta or gamma varies) into
    `sweep_dir`; return the markdown file's path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist: pass a sweep's folder (hydra.sweep.dir, "
                                "the one holding multirun.yaml)")
    check_sweep_folder(sweep_dir)
    runs, skipped = load_runs(sweep_dir)
    if not runs:
        log.warning("no finished run (%s) under %s", SUMMARY_FILE, sweep_dir)
    keys = setting_keys(runs)
    rows = summarize(runs, keys)
    write_csv(rows, keys, sweep_dir / CSV_FILE)
    grids = heatmap_grids(rows, keys, unfinished_loss_weights(skipped)) if rows else []
    heatmap = None
    for stale in (sweep_dir / HEATMAP_FILE, sweep_dir / HEATMAP_DATA_FILE):
        stale.unlink(missing_ok=True)
    if grids:
        heatmap = plot_heatmap(grids, sweep_dir / HEATMAP_FILE)
        (sweep_dir / HEATMAP_DATA_FILE).write_text(json.dumps([g.to_dict() for g in grids], indent=2) + "\n")
    return write_markdown(rows, keys, runs, skipped, sweep_dir, heatmap, sweep_dir / MARKDOWN_FILE)
