"""A paper-style comparison table (the paper's table 1) from finished runs.

    kasa-compare runs/sweeps/mrpc/2026-01-01_10-00-00_123456 runs/sweeps/cola/... --metric-scale 100

Every folder given is searched recursively for runs (a folder holding `summary.json`, as training writes it; runs
that crashed are skipped with a warning, like the sweep summary does). Rows are methods (with the model when the runs
use several, the rank when it varies, and any `--by` keys), each with its number of trained parameters
(`trainable_params_without_head` of summary.json: the adapters, not the task head, as the paper counts them, e.g.
0.3M; older summaries call it `trainable_params`); beta and gamma (`--by beta`) show only for the methods whose loss
has such a term;
columns are tasks (with their metric); a cell is the median over seeds of `best`, the best validation epoch, which
is what the paper reports; the best value of each column is in bold (ties at the printed precision all are); the
Average column is the mean over the tasks, for rows that have every task.

Written into --out (default: the one folder given, else the current folder): comparison.md, comparison.csv (full
precision, with the number of runs per cell) and comparison.tex (booktabs, \\textbf for the best).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kasa.adapters.config import has_loss_weight
from kasa.adapters.methods import METHOD_TABLE
from kasa.analysis.sweep import MISSING, OVERRIDE_ALIASES, Run, _sort_key, config_value, hashable, load_runs
from kasa.config import dotted_settings, is_bookkeeping
from kasa.evaluation.metrics import metric_scale
from kasa.run_dir import COMPARISON_FILES, OVERRIDES_KEY, RESUMED_WITH_CHANGES_KEY, SUMMARY_FILE, output_folder

log = logging.getLogger(__name__)


# Row order: the method table's (the paper's baselines first, then the ablation ladder up to KaSA); unknown methods
# after.
METHOD_ORDER = tuple(METHOD_TABLE)
# Column order: the paper's table 1, then the other GLUE tasks; unknown tasks after, alphabetically.
TASK_ORDER = ("sst2", "mrpc", "cola", "qnli", "rte", "stsb", "mnli", "qqp", "wnli")
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "qnli": "QNLI", "rte": "RTE", "stsb": "STS-B",
              "mnli": "MNLI", "qqp": "QQP", "wnli": "WNLI", "e2e": "E2E"}
# Settings that always tell rows apart already (the method, and the truncation basis in its label): a --by of them
# adds nothing.
IGNORED_BY_ROWS = ("method", "method.truncation_basis")
METRIC_NAMES = {"accuracy": "Acc.", "matthews": "Mcc.", "pearson": "Pcc.", "spearman": "Scc.", "f1": "F1",
                "ROUGE_L": "ROUGE-L"}  # as the paper's tables name them


# ---------------------------------------------------------------------------------------------------------------
# Runs


def collect_runs(paths: Iterable[str | Path]) -> tuple[list[Run], list[Path]]:
    """The finished runs under `paths` (run folders, sweep folders or any folder above them), each once, and the
    run folders skipped there (no result: failed, stopped, still training; each named in a warning)."""
    runs: dict[Path, Run] = {}
    skipped: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory: pass run or sweep directories")
        found, unfinished = load_runs(path)  # a run's own folder is that one run
        for run in found:
            runs.setdefault(run.path.resolve(), run)
        for folder in unfinished:
            skipped.setdefault(folder.resolve(), folder)
    return sorted(runs.values(), key=lambda r: str(r.path)), sorted(skipped.values(), key=str)


def model_name(run: Run) -> str | None:
    model = run.config.get("model") or {}
    name = model.get("name") if isinstance(model, dict) else None
    return str(name).rstrip("/").split("/")[-1] if name else None


def setting_value(run: Run, key: str) -> Any:
    """A summary field (method, rank, beta, ...), `model`, or a dotted config key (method.truncation_rank) read from
    the run's overrides, else its config.json."""
    if key == "model":
        return model_name(run)
    weight = key.removeprefix("method.")
    if weight in ("beta", "gamma") and not has_loss_weight(str(run.summary.get("method")), weight):
        return None  # a method without that term: nothing to show or to tell rows apart by
    if key in run.summary:
        return run.summary[key]
    if key in run.overrides:
        return _number(run.overrides[key])
    return config_value(run.config, key)


def has_setting(run: Run, key: str) -> bool:
    """Whether `setting_value(run, key)` finds `key` anywhere (its value may be None)."""
    return (key == "model" or key in run.summary or key in run.overrides
            or config_value(run.config, key, MISSING) is not MISSING)


def _settings(run: Run) -> dict[str, Any]:
    """What a `--by` key can tell this run apart by: its config's settings and overrides (the bookkeeping ones, the
    seed and the fields that repeat the summary's aside), the summary's rank, beta, gamma and recipe, and `model`."""
    found = {key: hashable(value) for key, value in dotted_settings(run.config).items()}
    found.update((key, _number(value)) for key, value in run.overrides.items())
    found = {k: v for k, v in found.items()
             if not is_bookkeeping(k) and k not in OVERRIDE_ALIASES and k not in IGNORED_BY_ROWS
             and k not in (OVERRIDES_KEY, RESUMED_WITH_CHANGES_KEY)}
    found.update((key, hashable(setting_value(run, key))) for key in ("rank", "beta", "gamma", "recipe", "model"))
    return found


def differing_settings(runs: Sequence[Run]) -> list[str]:
    """The settings in which runs of one method on one task differ: the `--by` keys that would split their cell."""
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for run in runs:
        cell = (str(run.summary.get("method")), truncation_basis(run), str(run.summary.get("task")),
                str(run.summary.get("metric")))
        cells.setdefault(cell, []).append(_settings(run))
    differing: set[str] = set()
    for members in cells.values():
        keys = set().union(*members)
        differing.update(k for k in keys if len({m.get(k) for m in members}) > 1)
    return sorted(differing)


def check_by_keys(runs: Sequence[Run], by: Sequence[str]) -> None:
    """Refuse a `--by` key that no run has (a typo would otherwise pool the runs as if --by were absent)."""
    for key in by:
        if "," in key and not any(has_setting(run, key) for run in runs):
            keys = [part.strip() for part in key.split(",") if part.strip()]
            raise ValueError(f"--by takes one setting; repeat it for several: {' '.join(f'--by {k}' for k in keys)}")
        sections = [value for run in runs if isinstance(value := setting_value(run, key), dict)]
        if sections:  # trainer, method.target_modules' parent...: the rows would be keyed by a whole dict
            inside = sorted({f"{key}.{name}" for section in sections for name in section})
            raise ValueError(f"--by {key} is a section of the config, not a setting: pass one of its settings "
                             f"({', '.join(inside[:8])}{', ...' if len(inside) > 8 else ''})")
        if key in IGNORED_BY_ROWS or any(has_setting(run, key) for run in runs):
            continue
        differing = differing_settings(runs)
        if differing:
            raise ValueError(f"no compared run has the setting --by {key}: pass one of the settings in which runs of "
                             f"one method on one task differ: {', '.join(differing)}")
        raise ValueError(f"no compared run has the setting --by {key}, and the runs of one method on one task differ "
                         "in nothing but their seed: leave --by out")


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _unranked(method: Any) -> bool:
    """Full fine-tuning and BitFit have no adapter rank."""
    return method in METHOD_TABLE and not METHOD_TABLE[method].ranked


def method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def task_sort_key(task: str) -> tuple[int, str]:
    return (TASK_ORDER.index(task), "") if task in TASK_ORDER else (len(TASK_ORDER), task)


def method_label(method: str, truncation_basis: str = "weight") -> str:
    """The method's name in tables and plots; a truncation in another basis than the paper's says so, e.g.
    "KaSA (activation)"."""
    label = METHOD_TABLE[method].label if method in METHOD_TABLE else method
    return label if truncation_basis == "weight" else f"{label} ({truncation_basis})"


def truncation_basis(run: Run) -> str:
    """The basis a truncating run's SVD truncation used (method.truncation_basis): `weight`, the paper's and what
    runs saved before the setting existed used, or `activation`. Runs of other methods: `weight`."""
    method = METHOD_TABLE.get(str(run.summary.get("method")))
    if method is None or not method.truncates:
        return "weight"
    return str(setting_value(run, "method.truncation_basis") or "weight")


def task_label(task: str, metric: str | None = None) -> str:
    name = TASK_NAMES.get(task, task)
    return f"{name} ({METRIC_NAMES.get(metric, metric)})" if metric else name


def format_params(count: int | None, decimals: int = 1) -> str:
    """Trainable parameters the way the paper prints them: 0.3M, 125.0M, 0.098M; `decimals` for 0.1M and more (the
    paper's table 2 prints 3.40M and 3.41M), and below, one significant digit more than it (0.074M at 1)."""
    if count is None:
        return ""
    millions = count / 1e6
    if count == 0:
        return "0"
    if millions >= 0.1:
        return f"{millions:.{decimals}f}M"
    return f"{millions:.{decimals + 1}g}M"


def params_decimals(counts: Iterable[int | None]) -> int:
    """The fewest decimals (from 1; 6 print every count whole) that print different counts differently (LoRA's
    3,407,872 and KaSA's 3,409,024 parameters are both 3.4M at one, MiniLM's 73,728 and 73,824 both 0.074M)."""
    distinct = {c for c in counts if c is not None}
    return next((d for d in range(1, 6) if len({format_params(c, d) for c in distinct}) == len(distinct)), 6)


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Cell:
    values: list[float]  # `best` of each run, unscaled
    seeds: list[Any]
    median: float  # unscaled

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Row:
    method: str
    setting: dict[str, Any]  # what besides the method identifies the row (model, rank, --by keys)
    label: str
    params: int | None
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # (task, metric) -> cell


@dataclass
class Table:
    columns: list[tuple[str, str]]  # (task, metric)
    rows: list[Row]
    scale: float = 1.0
    decimals: int = 4
    all_metrics: bool = False  # every metric of the runs' best epochs, not the main metric alone

    def params_text(self, row: Row) -> str:
        return format_params(row.params, params_decimals(r.params for r in self.rows))

    def value(self, row: Row, column: tuple[str, str]) -> float | None:
        cell = row.cells.get(column)
        return None if cell is None else cell.median * self.column_scale(column)

    def column_scale(self, column: tuple[str, str]) -> float:
        """The scale of a column's values: --metric-scale, except for metrics that are not fractions (E2E's NIST
        and CIDEr, which table 12 prints unscaled beside BLEU x 100; the judge's 1-10 score)."""
        return metric_scale(column[1], self.scale)

    def column_decimals(self, column: tuple[str, str]) -> int:
        """An unscaled column beside scaled ones keeps two decimals (NIST 8.86, CIDEr 2.55), as table 12 prints."""
        return max(self.decimals, 2) if self.column_scale(column) != self.scale else self.decimals

    @property
    def one_column_per_task(self) -> bool:
        return len({task for task, _ in self.columns}) == len(self.columns)

    def average(self, row: Row) -> float | None:
        """Mean of the row's (scaled) medians over the tasks; None when a task is missing, or when a task has
        columns of several metrics (a task counted twice, its metrics averaged together)."""
        values = [self.value(row, c) for c in self.columns]
        if not values or any(v is None for v in values) or not self.one_column_per_task:
            return None
        return float(np.mean(values))

    def model_blocks(self) -> dict[Any, list[int]]:
        """The row indices of each model (one block, keyed None, when the rows do not tell models apart)."""
        blocks: dict[Any, list[int]] = {}
        for i, row in enumerate(self.rows):
            blocks.setdefault(row.setting.get("model"), []).append(i)
        return blocks

    def bold(self) -> set[tuple[int, str]]:
        """(row index, column key) of the best value of each column and of the Average among the rows of one model
        (the paper bolds the best RoBERTa-base row and the best RoBERTa-large row; ties at the printed precision all
        bold); column key is `task:metric` or `average`."""
        marked: set[tuple[int, str]] = set()
        keyed = [(f"{t}:{m}", lambda row, c=(t, m): self.value(row, c)) for t, m in self.columns]
        keyed.append(("average", self.average))
        for key, get in keyed:
            for members in self.model_blocks().values():
                digits = self.column_decimals(tuple(key.split(":", 1))) if key != "average" else self.decimals
                shown = {i: round(v, digits) for i in members if (v := get(self.rows[i])) is not None}
                if shown:
                    top = max(shown.values())
                    marked.update((i, key) for i, v in shown.items() if v == top)
        return marked

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "columns": [{"task": t, "metric": m, "label": task_label(t, m)} for t, m in self.columns],
            "rows": [
                {
                    "method": row.method, "setting": row.setting, "label": row.label,
                    "trainable_params_without_head": row.params,
                    "cells": {f"{t}:{m}": None if (c := row.cells.get((t, m))) is None else
                              {"median": c.median, "n": c.n, "seeds": c.seeds, "values": c.values}
                              for t, m in self.columns},
                    "average": self.average(row),
                }
                for row in self.rows
            ],
        }


RECORD_KEYS = ("type", "epoch", "step", "split")  # an evaluation record's keys that are not metrics


def run_scores(run: Run, all_metrics: bool) -> dict[str, float]:
    """{metric: score} of a run: its main metric's `best`, or with `all_metrics` every metric its best epoch's
    evaluation reported (E2E's five, each commonsense set and their average), where its eval_history has that epoch."""
    main = {str(run.summary.get("metric")): float(run.summary["best"])}
    if not all_metrics:
        return main
    epoch = run.summary.get("best_epoch")  # counted from 1, as eval_history's epochs
    record = next((r for r in run.summary.get("eval_history") or () if r.get("epoch") == epoch), None)
    if record is None:
        return main
    return {k: float(v) for k, v in record.items() if k not in RECORD_KEYS and isinstance(v, (int, float))}


def build_table(runs: Sequence[Run], by: Sequence[str] = (), scale: float = 1.0, decimals: int | None = None,
                all_metrics: bool = False) -> Table:
    """Group `runs` into rows (method + model when several + rank when it varies + `by`; a model's rows together, as
    the paper's tables list them) and columns (task, metric); each cell is the median `best` over its runs (the
    seeds); with `all_metrics`, a column per metric of the runs' best epochs (run_scores)."""
    keys = []
    if len({model_name(r) for r in runs}) > 1:
        keys.append("model")
    if len({r.value("rank") for r in runs if not _unranked(r.summary.get("method"))}) > 1:
        keys.append("rank")
    check_by_keys(runs, by)
    keys += [k for k in by if k not in keys and k not in IGNORED_BY_ROWS]
    groups: dict[tuple, dict[tuple[str, str], list[Run]]] = {}
    scores = {id(run): run_scores(run, all_metrics) for run in runs}
    for run in runs:
        method = str(run.summary.get("method"))
        setting = tuple(hashable(setting_value(run, k)) for k in keys)  # a list (target_modules) as its JSON
        for metric in scores[id(run)]:
            column = (str(run.summary.get("task")), metric)
            groups.setdefault((method, truncation_basis(run), setting), {}).setdefault(column, []).append(run)
    # a task's metrics in the order its evaluations report them (BLEU, NIST, ...; the sets, then their average)
    reported = {c: i for i, c in enumerate(dict.fromkeys(c for cells in groups.values() for c in cells))}
    columns = sorted(reported, key=lambda c: (task_sort_key(c[0]), reported[c] if all_metrics else 0, c[1]))
    rows = []
    model_first = keys[:1] == ["model"]

    def order(group: tuple) -> tuple:
        method, basis, setting = group
        model = _sort_key(setting[0]) if model_first else None
        return model, method_sort_key(method), basis != "weight", basis, [_sort_key(v) for v in setting]

    for method, basis, setting in sorted(groups, key=order):
        cells_runs = groups[(method, basis, setting)]
        values = dict(zip(keys, setting))
        shown = {k: v for k, v in values.items()
                 if v is not None and not (k == "rank" and _unranked(method))}
        label = method_label(method, basis)
        if basis != "weight":
            values["method.truncation_basis"] = basis
        if shown.get("model"):
            label = f"{shown.pop('model')} ({label})"
        else:
            shown.pop("model", None)
        if shown:
            label += " " + ", ".join(f"{'r' if k == 'rank' else k}={_fmt(v)}" for k, v in shown.items())
        counts = Counter(r.params_without_head for rs in cells_runs.values() for r in rs)
        counts.pop(None, None)
        params = counts.most_common(1)[0][0] if counts else None
        if len(counts) > 1:
            log.warning("%s: runs report different parameter counts %s; showing the most common", label,
                        sorted(counts))
        row = Row(method, values, label, params)
        for column, members in cells_runs.items():
            best = [scores[id(r)][column[1]] for r in members]
            seeds = [r.summary.get("seed") for r in members]
            repeated = [s for s, n in Counter(seeds).items() if n > 1]
            differing = [k for k in differing_settings(members) if k not in keys]
            if differing:  # a median over seeds of runs that are not the same run but for the seed
                log.warning("%s on %s pools %d runs that differ in %s: pass --by with the key(s) that tell them apart",
                            label, column[0], len(members), ", ".join(differing))
            elif repeated:
                log.warning("%s on %s pools runs with the same seed %s (runs of different settings?); pass --by "
                            "with the key that tells them apart", label, column[0], repeated)
            row.cells[column] = Cell(best, seeds, float(np.median(best)))
        rows.append(row)
    if decimals is None:
        decimals = 1 if scale >= 100 else 4
    return Table(columns, rows, scale, decimals, all_metrics)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------------------------
# Writers


def _cells(table: Table, bold: set[tuple[int, str]], emphasise) -> list[list[str]]:
    """Per row: label, parameters, the formatted cells and the average, bold ones wrapped by `emphasise`."""
    lines = []
    for i, row in enumerate(table.rows):
        cells = [row.label, table.params_text(row)]
        for task, metric in table.columns:
            value = table.value(row, (task, metric))
            text = "" if value is None else f"{value:.{table.column_decimals((task, metric))}f}"
            cells.append(emphasise(text) if (i, f"{task}:{metric}") in bold and text else text)
        average = table.average(row)
        text = "" if average is None else f"{average:.{table.decimals}f}"
        cells.append(emphasise(text) if (i, "average") in bold and text else text)
        lines.append(cells)
    return lines


def header(table: Table) -> list[str]:
    return ["Method", "# Trainable Parameters", *(task_label(t, m) for t, m in table.columns), "Avg."]


def to_markdown(table: Table, sources: Sequence[Path] = (), skipped: Sequence[Path] = ()) -> str:
    bold = table.bold()
    head = header(table)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(table, bold, lambda t: f"**{t}**")]
    counts = Counter(c.n for row in table.rows for c in row.cells.values())
    unscaled = sorted({m for c in table.columns if table.column_scale(c) != table.scale for m in c[1:]})
    scale = f" x {table.scale:g}" + (f" ({', '.join(unscaled)} unscaled)" if unscaled else "") \
        if table.scale != 1 else ""
    notes = [
        "",
        ("Cells: median over seeds of each metric at the best validation epoch (by the task's main metric; "
         "eval_history in summary.json)" if table.all_metrics else
         "Cells: median over seeds of the best validation epoch (`best` in summary.json)") + f"{scale}; "
        f"runs per cell: {', '.join(f'{n} ({k} cells)' for n, k in sorted(counts.items())) or 'none'}. "
        f"Best per column in bold{' (per model)' if len(table.model_blocks()) > 1 else ''}. "
        "Avg.: mean over the tasks, for rows with every task"
        + (" (none here: a task is scored in several metrics)" if not table.one_column_per_task else "") + ". "
        "Trainable parameters: the adapters, without the task head.",
    ]
    if sources:
        notes.append(f"Runs from: {', '.join(str(p) for p in sources)}")
    if skipped:  # a sweep with failed or unfinished jobs: its cells hold fewer runs than it has seeds
        notes.append(f"Skipped, without a result (failed, stopped or still training): "
                     f"{', '.join(f'`{p}`' for p in skipped)}")
    return "\n".join(lines + notes) + "\n"


def to_latex(table: Table) -> str:
    bold = table.bold()
    head = header(table)
    lines = [
        "\\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        "\\toprule",
        " & ".join(_latex_escape(h) for h in head) + " \\\\",
        "\\midrule",
    ]
    for cells in _cells(table, bold, lambda t: f"\\textbf{{{t}}}"):
        lines.append(" & ".join([_latex_escape(cells[0]), _latex_escape(cells[1]), *cells[2:]]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("$", "\\$"), ("#", "\\#"),
                          ("_", "\\_"), ("{", "\\{"), ("}", "\\}")):
        text = text.replace(char, escaped)
    return text


def write_csv(table: Table, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        columns = [f"{t}:{m}" for t, m in table.columns]
        writer.writerow(["method", "label", "trainable_params_without_head", *columns, "average",
                         *(f"{c} n" for c in columns)])
        for row in table.rows:
            values = [table.value(row, c) for c in table.columns]
            average = table.average(row)
            writer.writerow(
                [row.method, row.label, "" if row.params is None else row.params]
                + ["" if v is None else repr(v) for v in values]
                + ["" if average is None else repr(average)]
                + [row.cells[c].n if c in row.cells else 0 for c in table.columns]
            )
    return path


def compare(paths: Sequence[str | Path], out: str | Path | None = None, scale: float = 1.0,
            decimals: int | None = None, by: Sequence[str] = (), all_metrics: bool = False
            ) -> tuple[Table, dict[str, Path]]:
    """Build the comparison table of the runs under `paths` and write it (markdown, CSV, LaTeX) into `out`."""
    paths = [Path(p) for p in paths]
    runs, skipped = collect_runs(paths)
    if not runs:
        raise ValueError(f"no finished run ({SUMMARY_FILE} with a finite `best`) under {', '.join(map(str, paths))}")
    table = build_table(runs, by=by, scale=scale, decimals=decimals, all_metrics=all_metrics)
    out = Path(out) if out is not None else (paths[0] if len(paths) == 1 else Path.cwd())
    output_folder(out)
    files = {kind: out / name for kind, name in COMPARISON_FILES.items()}
    files["markdown"].write_text(to_markdown(table, paths, skipped))
    write_csv(table, files["csv"])
    files["latex"].write_text(to_latex(table))
    return table, files
