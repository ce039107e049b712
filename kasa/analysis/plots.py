"""The paper's in-depth analyses as plots (PNG, matplotlib's Agg backend), drawn from a run's or a sweep's saved
files alone. Each function returns the data it plotted and writes it as JSON next to the PNG (same name, .json).

Of one run (`kasa-plot <run dir>`):
  singular_values   figure 4: KaSA's learned singular values dSigma, per layer (x) and position (y), one heatmap per
                    adapted matrix type (query, value, ...), from checkpoints/<best|last>/adapter_model.safetensors
                    -> singular_values_<checkpoint>.png
  regularization    figure 11: L2 = sum(dSigma^2), ||dU^T dU - I||_F and ||dV^T dV - I||_F over training for each
                    matrix of one layer (default: the last), from regularization.jsonl, and the total training loss
                    from metrics.jsonl -> regularization_layer<L>.png
Of a sweep or any set of runs (`kasa-plot <sweep dirs...>`; medians over seeds of `best`):
  ablation          figure 2 / 8: bars lora, svd_lora, kasa_sv, kasa_l2, kasa per task -> ablation.png
  rank              figure 3 / table 13: metric vs rank r per method, per task -> rank.png (+ rank_table.md)
  truncation        figure 9: metric vs SVD truncation rank k per method, per task -> truncation.png; k is
                    method.truncation_rank of the run's config.json (null: the rank r)
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kasa.analysis.compare import (
    collect_runs,
    differing_settings,
    method_label,
    model_name,
    task_label,
    task_sort_key,
    method_sort_key,
    truncation_basis,
)
from kasa.adapters.methods import ABLATION_LADDER, methods_where
from kasa.analysis.sweep import Run
from kasa.evaluation.metrics import UNSCALED_METRICS, metric_scale
from kasa.run_dir import (
    ABLATION_FIGURE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    METRICS_FILE,
    RANK_FIGURE,
    RANK_TABLE_FILE,
    REGULARIZATION_FIGURE,
    REGULARIZATION_FILE,
    SINGULAR_VALUES_FIGURE,
    TRUNCATION_FIGURE,
    find_checkpoint,
    finite_numbers,
    output_folder,
    read_config,
)

log = logging.getLogger(__name__)

LADDER = ABLATION_LADDER  # the paper's figure 2, left to right
TRUNCATING = methods_where(truncates=True)  # methods whose truncation rank k means something
LINE_STYLES = ("-", "--", ":", "-.")  # with the colour, a line series' own look: 40 series before one repeats
TERMS = ("l2", "l3_u", "l3_v")
TERM_LABELS = {"l2": "L2 = sum(dSigma^2)", "l3_u": "||dU^T dU - I||_F", "l3_v": "||dV^T dV - I||_F"}
# method.orth_form=authors (the GLUE recipes): the released code's norms of the large Grams, dU n x r, dV m x r
AUTHORS_TERM_LABELS = {**TERM_LABELS, "l3_u": "||dU dU^T - I_n||_F", "l3_v": "||dV dV^T - I_m||_F"}


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _marker(steps: Sequence[Any]) -> str | None:
    """A line of one logged step is no line: it is drawn as a point."""
    return "o" if len(steps) == 1 else None


def written_files(done: dict[str, dict[str, Any]]) -> list[str]:
    """The files that drawing `done` (kind -> its plotted data) wrote, besides each PNG's JSON."""
    files = [data["png"] for data in done.values()]
    if "rank" in done:
        files.append(str(Path(done["rank"]["png"]).with_name(RANK_TABLE_FILE)))
    return files


def _save(fig, data: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Any]:
    output_folder(out_dir)
    data = {"png": f"{stem}.png", **data}
    fig.savefig(out_dir / f"{stem}.png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return {**data, "png": str(out_dir / f"{stem}.png")}  # the JSON names the PNG beside it; this, its path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def split_module(name: str) -> tuple[int | None, str]:
    """`roberta.encoder.layer.11.attention.self.query` -> (11, `attention.self.query`): the last numeric component
    is the layer, what follows it the matrix (the whole name when there is no number)."""
    matches = list(LAYER_INDEX.finditer(name))
    if not matches:
        return None, name
    last = matches[-1]
    return int(last.group(1)), name[last.end():] if last.end() < len(name) else name


def short_labels(names: Sequence[str]) -> dict[str, str]:
    """Drop the leading dotted components all names share (each keeps at least its last one):
    {attention.self.query, attention.self.value} -> {query, value}."""
    parts = {n: n.split(".") for n in set(names)}
    drop = 0
    while True:
        heads = {p[drop] if len(p) > drop + 1 else None for p in parts.values()}
        if len(heads) != 1 or None in heads:
            break
        drop += 1
    return {n: ".".join(p[drop:]) for n, p in parts.items()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not JSON (an interrupted write?): skipped", path, number)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Figure 4: knowledge-aware singular values per layer and position


def singular_values(path: str | Path, which: str | None = None,
                    out_dir: str | Path | None = None) -> dict[str, Any]:
    """Figure 4: heatmaps of the learned dSigma (raw parameter values; the update is scaled by alpha / r on top), one
    per adapted matrix type, layer index on x and position on y."""
    from kasa.adapters.io import read_adapter_tensors

    checkpoint, run_dir = find_checkpoint(Path(path), which)
    tensors = read_adapter_tensors(checkpoint)
    sigmas: dict[str, np.ndarray] = {}
    for key, tensor in tensors.items():
        if key.endswith(".delta_sigma") and ".adapters." in key:
            module, _, part = key[: -len(".delta_sigma")].partition(".adapters.")
            sigmas[module if part == "weight" else f"{module}.{part}"] = tensor.float().numpy()
    if not sigmas:
        raise ValueError(f"{checkpoint / ADAPTER_WEIGHTS_FILE} holds no KaSA singular values (delta_sigma): figure 4 needs a "
                         "run of kasa, kasa_l2 or kasa_sv")
    located = {name: split_module(name) for name in sigmas}
    labels = short_labels([matrix for _, matrix in located.values()])
    matrices: dict[str, dict[str, Any]] = {}
    for name in sorted(sigmas, key=lambda n: (labels[located[n][1]], located[n][0] or 0)):
        layer, matrix = located[name]
        entry = matrices.setdefault(labels[matrix], {"modules": [], "layers": [], "sigma": []})
        entry["modules"].append(name)
        entry["layers"].append(layer if layer is not None else 0)
        entry["sigma"].append(sigmas[name])
    for entry in matrices.values():
        rank = max(len(s) for s in entry["sigma"])
        grid = np.full((rank, len(entry["layers"])), np.nan)
        for column, sigma in enumerate(entry["sigma"]):
            grid[: len(sigma), column] = sigma
        entry["positions"] = list(range(rank))
        entry["values"] = finite_numbers(grid.tolist())  # positions a layer lacks: null
        entry["_grid"] = grid
        del entry["sigma"]
    scaling = None
    config_file = checkpoint / ADAPTER_CONFIG_FILE
    if config_file.is_file():
        try:
            settings = json.loads(config_file.read_text())["config"]
            scaling = settings["alpha"] / settings["rank"]
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            pass

    plt = _pyplot()
    names = list(matrices)
    fig, axes = plt.subplots(1, len(names), figsize=(max(4.0, 0.45 * len(matrices[names[0]]["layers"]) + 2.5)
                                                     * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        entry = matrices[name]
        grid = entry.pop("_grid")
        limit = float(np.nanmax(np.abs(grid))) or 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto",
                          origin="lower")
        ax.set_xticks(range(len(entry["layers"])), [str(layer) for layer in entry["layers"]])
        ax.set_yticks(range(len(entry["positions"])), [str(p) for p in entry["positions"]])
        ax.set_xlabel("layer")
        ax.set_ylabel("position")
        ax.set_title(f"{name}: dSigma")
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"knowledge-aware singular values ({checkpoint.name} checkpoint)")
    fig.tight_layout()
    data = {"checkpoint": str(checkpoint), "scaling": scaling, "matrices": matrices}
    return _save(fig, data, Path(out_dir) if out_dir else run_dir, f"{SINGULAR_VALUES_FIGURE}{checkpoint.name}")


# ---------------------------------------------------------------------------------------------------------------
# Figure 11: regularisation terms of one layer and the total loss over training


def regularization(run_dir: str | Path, layer: int | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Figure 11: for each adapted matrix of `layer` (default: the last layer), L2 and the two L3 terms per logged
    step (regularization.jsonl), and the total training loss (metrics.jsonl)."""
    run_dir = Path(run_dir)
    path = run_dir / REGULARIZATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: runs of kasa / kasa_l2 (beta or gamma > 0) write it")
    records = [r for r in _read_jsonl(path) if isinstance(r.get("modules"), dict) and r.get("modules")]
    if not records:
        raise ValueError(f"{path} has no per-module record")
    located = {name: split_module(name) for r in records for name in r["modules"]}
    layers = sorted({lay for lay, _ in located.values() if lay is not None})
    if layer is None:
        layer = layers[-1] if layers else None
    elif layer not in layers:
        raise ValueError(f"layer {layer} was not logged; layers in {path.name}: {layers}")
    chosen = sorted(name for name, (lay, _) in located.items() if lay == layer)
    labels = short_labels([located[name][1] for name in chosen])
    modules: dict[str, dict[str, Any]] = {}
    for name in chosen:
        series: dict[str, Any] = {"module": name, "step": [], **{t: [] for t in TERMS}}
        for record in records:
            values = record["modules"].get(name)
            if values is None:
                continue
            series["step"].append(record["step"])
            for term, value in zip(TERMS, values):
                series[term].append(value)
        modules[labels[located[name][1]]] = series
    loss: dict[str, list] = {"step": [], "loss": [], "task_loss": []}
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        for record in _read_jsonl(metrics_path):
            if record.get("type") == "train" and "loss" in record:
                loss["step"].append(record["step"])
                loss["loss"].append(record["loss"])
                loss["task_loss"].append(record.get("task_loss"))

    orth_form = read_config(run_dir).get("method", {}).get("orth_form", "paper")
    term_labels = AUTHORS_TERM_LABELS if orth_form == "authors" else TERM_LABELS
    plt = _pyplot()
    columns = max(1, len(modules))
    fig = plt.figure(figsize=(4.2 * columns, 9.0))
    grid = fig.add_gridspec(len(TERMS) + 1, columns)
    for j, (label, series) in enumerate(modules.items()):
        for i, term in enumerate(TERMS):
            ax = fig.add_subplot(grid[i, j])
            ax.plot(series["step"], series[term], color=f"C{i}", marker=_marker(series["step"]))
            ax.set_ylabel(term_labels[term])
            if i == 0:
                ax.set_title(f"{label} (layer {layer})")
            if i == len(TERMS) - 1:
                ax.set_xlabel("step")
    ax = fig.add_subplot(grid[len(TERMS), :])
    ax.plot(loss["step"], loss["loss"], color="black", marker=_marker(loss["step"]))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("overall training loss")
    fig.tight_layout()
    data = {"run": str(run_dir), "layer": layer, "layers": layers, "orth_form": orth_form, "modules": modules,
            "loss": loss}
    return _save(fig, data, Path(out_dir) if out_dir else run_dir, f"{REGULARIZATION_FIGURE}{layer}")


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: medians over seeds


def _runs(source: Sequence[str | Path] | Sequence[Run]) -> list[Run]:
    items = list(source)
    if items and all(isinstance(r, Run) for r in items):
        return items  # type: ignore[return-value]
    return collect_runs(items)[0]  # type: ignore[arg-type]


def _out_dir(source: Sequence[Any], out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    paths = [p for p in source if not isinstance(p, Run)]
    if len(paths) == 1:
        return Path(paths[0])
    raise ValueError("the plots of several directories need one folder to go to: pass --out DIR (kasa-plot, "
                     "kasa-compare --plots) or out_dir=... (Python)")


def configured_truncation_rank(run: Run) -> int | None:
    """method.truncation_rank as the run set it (summary, overrides or config.json), None when left null."""
    method = run.config.get("method")
    for value in (run.summary.get("truncation_rank"), run.overrides.get("method.truncation_rank"),
                  method.get("truncation_rank") if isinstance(method, dict) else None):
        if value not in (None, "null", "None"):
            return int(value)
    return None


def truncation_rank(run: Run) -> int | None:
    """k of a run: method.truncation_rank of its config.json (or overrides, or summary), null meaning the rank."""
    configured = configured_truncation_rank(run)
    if configured is not None:
        return configured
    rank = run.value("rank")
    return int(rank) if rank is not None else None


def _series_name(method: str, basis: str) -> str:
    """A series' key in the plotted data: the method, and the truncation basis when it is not the paper's."""
    return method if basis == "weight" else f"{method} ({basis})"


def _medians(runs: Sequence[Run], x: Callable[[Run], Any], methods: Sequence[str] | None,
             axis: str | None = None) -> dict[str, Any]:
    """{panel: {task, metric, model, title, series: {name: {method, truncation_basis, label, x: [...], median: [...],
    n: [...], seeds: [...]}}}} over `runs`, a panel per task, metric and model (named by the task, "task (metric)"
    when its runs report several metrics, and " [model]" added when they come from several models: scores of
    different metrics or models are never pooled); runs of one method truncated in different bases are different
    series. `axis`: what x is (for the warnings), None for one point per series."""
    grouped: dict[tuple[str, str, str | None], dict[tuple[str, str], dict[Any, list[Run]]]] = {}
    for run in runs:
        method = str(run.summary.get("method"))
        if methods is not None and method not in methods:
            continue
        value = x(run)
        if value is None:
            continue
        panel = (str(run.summary.get("task")), str(run.summary.get("metric")), model_name(run))
        variant = (method, truncation_basis(run))
        grouped.setdefault(panel, {}).setdefault(variant, {}).setdefault(value, []).append(run)
    for (task, _, _), per_variant in grouped.items():
        for variant, points in per_variant.items():
            for value, members in points.items():
                seeds = [r.summary.get("seed") for r in members]
                if len(set(seeds)) < len(seeds):
                    differing = differing_settings(members)
                    log.warning("%s, %s%s: the median pools %d runs of which some share a seed%s: plot the runs of "
                                "one setting alone (their folders)", task, method_label(*variant),
                                f" at {axis} {value}" if axis else "", len(members),
                                f", and which differ in {', '.join(differing)}" if differing else "")
    several_metrics = {task for task, count in Counter(task for task, _ in {p[:2] for p in grouped}).items()
                       if count > 1}
    several_models = len({model for _, _, model in grouped}) > 1
    tasks: dict[str, Any] = {}
    for task, metric, model in sorted(grouped, key=lambda p: (task_sort_key(p[0]), p[1], str(p[2]))):
        variants = grouped[(task, metric, model)]
        series = {}
        order = list(methods) if methods is not None else sorted({m for m, _ in variants}, key=method_sort_key)
        for method, basis in sorted(variants, key=lambda v: (order.index(v[0]), v[1] != "weight", v[1])):
            points = variants[(method, basis)]
            xs = sorted(points, key=lambda v: (isinstance(v, str), v))
            series[_series_name(method, basis)] = {
                "method": method,
                "truncation_basis": basis,
                "label": method_label(method, basis),
                "x": xs,
                "median": [float(np.median([float(r.summary["best"]) for r in points[v]])) for v in xs],
                "n": [len(points[v]) for v in xs],
                "seeds": [[r.summary.get("seed") for r in points[v]] for v in xs],
            }
        model_part = f" [{model}]" if several_models else ""
        name = (f"{task} ({metric})" if task in several_metrics else task) + model_part
        tasks[name] = {"task": task, "metric": metric, "model": model,
                       "title": task_label(task, metric) + model_part, "series": series}
    return tasks


def _scaled(tasks: dict[str, Any], scale: float) -> None:
    """Each panel's medians times `scale`, or as they are for a metric that is not a fraction (metric_scale); the
    panel's factor in its "scale"."""
    for entry in tasks.values():
        entry["scale"] = metric_scale(entry["metric"], scale)
        for series in entry["series"].values():
            series["median"] = [v * entry["scale"] for v in series["median"]]


def _metric_label(entry: dict[str, Any]) -> str:
    return f"median {entry['metric']}" + (f" x {entry['scale']:g}" if entry["scale"] != 1 else "")


def ablation(source: Sequence[str | Path] | Sequence[Run], out_dir: str | Path | None = None,
             scale: float = 1.0) -> dict[str, Any]:
    """Figure 2: per task, one bar per method of the ablation ladder (lora, svd_lora, kasa_sv, kasa_l2, kasa) at the
    median `best` over seeds."""
    runs = _runs(source)
    tasks = _medians(runs, lambda run: "all", LADDER)
    tasks = {t: e for t, e in tasks.items() if e["series"]}
    if not tasks:
        raise ValueError(f"no run of the ablation methods ({', '.join(LADDER)}) found")
    _scaled(tasks, scale)
    bars: dict[str, Any] = {}
    for task, entry in tasks.items():
        methods = list(entry["series"])
        bars[task] = {
            "task": entry["task"],
            "metric": entry["metric"],
            "model": entry["model"],
            "title": entry["title"],
            "scale": entry["scale"],
            "methods": methods,
            "labels": [entry["series"][m]["label"] for m in methods],
            "ladder_steps": [LADDER.index(entry["series"][m]["method"]) + 1 for m in methods],
            "truncation_bases": [entry["series"][m]["truncation_basis"] for m in methods],
            "median": [entry["series"][m]["median"][0] for m in methods],
            "n": [entry["series"][m]["n"][0] for m in methods],
            "seeds": [entry["series"][m]["seeds"][0] for m in methods],
        }

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(bars), figsize=(4.2 * len(bars), 4.0), squeeze=False)
    for ax, (task, entry) in zip(axes[0], bars.items()):
        positions = range(len(entry["methods"]))
        colors = [f"C{step - 1}" for step in entry["ladder_steps"]]
        # Another truncation basis than the paper's: the rung's colour, hatched (the legend lists the variant).
        hatches = ["" if basis == "weight" else "//" for basis in entry["truncation_bases"]]
        ax.bar(positions, entry["median"], color=colors, hatch=hatches)
        low, high = min(entry["median"]), max(entry["median"])
        margin = (high - low) * 0.5 or abs(high) * 0.02 or 0.01
        ax.set_ylim(low - margin, high + margin * 0.6)
        for p, v in zip(positions, entry["median"]):
            ax.text(p, v, f"{v:.4g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(positions), [str(step) + ("*" if basis != "weight" else "") for step, basis in
                                        zip(entry["ladder_steps"], entry["truncation_bases"])])
        ax.set_title(entry["title"])
        ax.set_ylabel(_metric_label(entry))
    steps = sorted({step for e in bars.values() for step in e["ladder_steps"]})  # the rungs that ran, no others
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{step - 1}") for step in steps]
    names = [f"{step}: {method_label(LADDER[step - 1])}" for step in steps]
    variants = sorted({(step, label) for e in bars.values() for step, label, basis in
                       zip(e["ladder_steps"], e["labels"], e["truncation_bases"]) if basis != "weight"})
    for step, label in variants:
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor=f"C{step - 1}", hatch="//"))
        names.append(f"{step}*: {label}")
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), len(LADDER)), fontsize=8,
               bbox_to_anchor=(0.5, -0.08 * (1 + (len(names) > len(LADDER)))))
    fig.suptitle("components ablation (median over seeds)")
    fig.tight_layout()
    return _save(fig, {"scale": scale, "legend": names, "tasks": bars}, _out_dir(source, out_dir), ABLATION_FIGURE)


def _lines(source, out_dir, scale, methods, x, xlabel, stem, title, key) -> dict[str, Any]:
    runs = _runs(source)
    tasks = _medians(runs, x, methods, xlabel)
    tasks = {t: e for t, e in tasks.items() if e["series"]}
    if not tasks:
        raise ValueError(f"no run to plot against {xlabel}")
    _scaled(tasks, scale)
    for entry in tasks.values():
        for series in entry["series"].values():
            series[key] = series.pop("x")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, (task, entry) in zip(axes[0], tasks.items()):
        ticks: set = set()
        for i, series in enumerate(entry["series"].values()):
            # matplotlib's ten colours come round again: the line style tells the 11th series from the 1st
            ax.plot(series[key], series["median"], marker="o", label=series["label"], color=f"C{i % 10}",
                    linestyle=LINE_STYLES[i // 10 % len(LINE_STYLES)])
            ticks.update(series[key])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_metric_label(entry))
        ax.set_title(entry["title"])
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, {"scale": scale, "tasks": tasks}, _out_dir(source, out_dir), stem)


def rank(source: Sequence[str | Path] | Sequence[Run], out_dir: str | Path | None = None, scale: float = 1.0,
         methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Figure 3 / table 13: median `best` against the rank r (log2 axis), one line per method, one panel per task;
    also writes rank_table.md (rows task x method, columns r)."""
    data = _lines(source, out_dir, scale, methods, lambda run: run.value("rank"), "rank r", RANK_FIGURE,
                  "budget parameter scalability (median over seeds)", "rank")
    ranks = sorted({r for e in data["tasks"].values() for s in e["series"].values() for r in s["rank"]})
    lines = ["| Dataset | Method | " + " | ".join(str(r) for r in ranks) + " |", "|---|---|" + "---:|" * len(ranks)]
    for task, entry in data["tasks"].items():
        for method, series in entry["series"].items():
            values = dict(zip(series["rank"], series["median"]))
            decimals = 2 if entry["scale"] >= 100 or entry["metric"] in UNSCALED_METRICS else 4
            cells = [f"{values[r]:.{decimals}f}" if r in values else "" for r in ranks]
            name = entry["title"]
            lines.append(f"| {name} | {series['label']} | " + " | ".join(cells) + " |")
    scaled = f" x {scale:g} ({', '.join(UNSCALED_METRICS)}, not fractions, as they are)" if scale != 1 else ""
    (_out_dir(source, out_dir) / RANK_TABLE_FILE).write_text("\n".join(lines) + f"\n\nMedian over seeds of `best`{scaled}.\n")
    return data


def truncation(source: Sequence[str | Path] | Sequence[Run], out_dir: str | Path | None = None, scale: float = 1.0,
               methods: Sequence[str] | None = TRUNCATING) -> dict[str, Any]:
    """Figure 9: median `best` against the SVD truncation rank k (log2 axis), one line per truncating method."""
    return _lines(source, out_dir, scale, methods, truncation_rank, "truncation rank k", TRUNCATION_FIGURE,
                  "rank k of the knowledge-based SVD truncation (median over seeds)", "truncation_rank")


# ---------------------------------------------------------------------------------------------------------------
# Everything that applies


def plot_run(run_dir: str | Path, layer: int | None = None, which: str | None = None,
             out_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The single-run plots the run's files support (figure 4 for KaSA checkpoints, figure 11 when
    regularization.jsonl exists)."""
    done: dict[str, dict[str, Any]] = {}
    if (Path(run_dir) / REGULARIZATION_FILE).is_file():  # first: a bad --layer fails before anything is written
        try:
            done["regularization"] = regularization(run_dir, layer, out_dir)
        except ValueError as err:
            if layer is not None:  # a layer asked for by name that the run did not log: say so
                raise
            log.info("no regularisation plot: %s", err)
    from kasa.adapters.io import UnreadableAdapter

    try:
        done["singular_values"] = singular_values(run_dir, which, out_dir)
    except (FileNotFoundError, ValueError) as err:
        if which is not None:  # figure 4's checkpoint asked for by name: say why it cannot be drawn
            raise
        # a damaged checkpoint is said (the other plot stands); a run without one, or not of KaSA, is not an error
        log.log(logging.WARNING if isinstance(err, UnreadableAdapter) else logging.INFO, "no singular-value plot: %s",
                err)
    return done


def plot_sweep(source: Sequence[str | Path] | Sequence[Run], out_dir: str | Path | None = None,
               scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """The sweep plots the runs support: the ablation bars when two or more ladder methods ran on a task, metric vs
    r when a method ran at two or more ranks, metric vs k when a truncating method ran at two or more k."""
    runs = _runs(source)
    target = _out_dir(source, out_dir)
    done: dict[str, dict[str, Any]] = {}

    def varies(x: Callable[[Run], Any], methods: Sequence[str] | None, fixed: Callable[[Run], Any]) -> bool:
        """Does x take two or more values for one task, model and method with `fixed` the same?"""
        seen: dict[tuple, set] = {}
        for run in runs:
            method = run.summary.get("method")
            if methods is None or method in methods:
                seen.setdefault((run.summary.get("task"), model_name(run), method, fixed(run)), set()).add(x(run))
        return any(len(v - {None}) >= 2 for v in seen.values())

    # The ablation bars need the ablation-only methods (a rank sweep of lora and kasa is not an ablation).
    if any(run.summary.get("method") in LADDER[1:-1] for run in runs):
        done["ablation"] = ablation(runs, target, scale)
    if varies(lambda run: run.value("rank"), None, configured_truncation_rank):
        done["rank"] = rank(runs, target, scale)
    if varies(truncation_rank, TRUNCATING, lambda run: run.value("rank")):
        done["truncation"] = truncation(runs, target, scale)
    return done
