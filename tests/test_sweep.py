"""kasa.analysis.sweep on fake Hydra multirun directories (no training involved)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from kasa.analysis import sweep
from kasa.cli import sweep as sweep_cli
from kasa.analysis.sweep import summarize_sweep

BETAS = [1e-4, 1e-2]
GAMMAS = [1e-3, 1e-1]
SEEDS = [0, 1, 2]


def _score(beta: float, gamma: float, seed: int) -> float:
    """Distinct, irregular scores so that the median is not also the mean or the middle seed by accident."""
    rng = np.random.default_rng(int(1e6 * beta) * 7 + int(1e4 * gamma) * 13 + seed)
    return float(0.6 + 0.3 * rng.random())


def _write_run(directory: Path, *, beta: float, gamma: float, seed: int, best: float, overrides=None, **extra):
    directory.mkdir(parents=True)
    (directory / ".hydra").mkdir()
    summary = {
        "task": "cola", "method": "kasa", "metric": "matthews", "best": best, "best_epoch": 3, "last": best - 0.01,
        "trainable_params": 1234, "train_seconds": 1.5, "seed": seed, "beta": beta, "gamma": gamma, "rank": 8,
        "overrides": overrides if overrides is not None
        else [f"method.beta={beta}", f"method.gamma={gamma}", f"seed={seed}", "recipe=glue/roberta_base_cola"],
    }
    summary.update(extra)
    (directory / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def grid_sweep(tmp_path: Path) -> tuple[Path, dict[tuple[float, float], list[float]]]:
    """2 betas x 2 gammas x 3 seeds, in Hydra's layout (numbered job folders, multirun.yaml at the top)."""
    scores: dict[tuple[float, float], list[float]] = {}
    job = 0
    for beta in BETAS:
        for gamma in GAMMAS:
            for seed in SEEDS:
                best = _score(beta, gamma, seed)
                scores.setdefault((beta, gamma), []).append(best)
                _write_run(tmp_path / str(job), beta=beta, gamma=gamma, seed=seed, best=best)
                job += 1
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    return tmp_path, scores


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_csv_medians_match_numpy(grid_sweep):
    sweep_dir, scores = grid_sweep
    md = summarize_sweep(sweep_dir)
    assert md == sweep_dir / "sweep_summary.md"
    rows = _read_csv(sweep_dir / "sweep_summary.csv")
    assert len(rows) == 4
    assert list(rows[0]) == ["method", "rank", "beta", "gamma", "n", "seeds", "median", "min", "max", "std"]
    for row in rows:
        values = np.array(scores[(float(row["beta"]), float(row["gamma"]))])
        assert row["method"] == "kasa" and row["rank"] == "8"
        assert int(row["n"]) == 3 and row["seeds"] == "0 1 2"
        assert float(row["median"]) == pytest.approx(np.median(values), abs=1e-12)
        assert float(row["min"]) == pytest.approx(values.min(), abs=1e-12)
        assert float(row["max"]) == pytest.approx(values.max(), abs=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)


def test_markdown_table(grid_sweep):
    sweep_dir, scores = grid_sweep
    text = summarize_sweep(sweep_dir).read_text()
    assert "| method | rank | beta | gamma | n | seeds | median | min | max | std |" in text
    assert text.count("| kasa | 8 |") == 4
    best = max(np.median(v) for v in scores.values())
    assert f"best median: {best:.4f}" in text
    assert "heatmap.png" in text


def test_heatmap_written_and_matrix_matches(grid_sweep):
    sweep_dir, scores = grid_sweep
    summarize_sweep(sweep_dir)
    png = sweep_dir / "heatmap.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = json.loads((sweep_dir / "heatmap.json").read_text())
    assert len(panels) == 1
    panel = panels[0]
    assert panel["beta"] == BETAS and panel["gamma"] == GAMMAS
    expected = [[np.median(scores[(b, g)]) for g in GAMMAS] for b in BETAS]
    np.testing.assert_allclose(np.array(panel["median"]), np.array(expected), rtol=0, atol=1e-12)

    # the same matrix straight from the public helpers
    runs, skipped = sweep.load_runs(sweep_dir)
    keys = sweep.setting_keys(runs)
    (grid,) = sweep.heatmap_grids(sweep.summarize(runs, keys), keys)
    np.testing.assert_allclose(grid.median, np.array(expected), rtol=0, atol=1e-12)
    assert not skipped


def test_runs_without_summary_are_skipped_with_a_warning(grid_sweep, caplog):
    sweep_dir, scores = grid_sweep
    crashed = sweep_dir / "12"
    (crashed / ".hydra").mkdir(parents=True)
    broken = sweep_dir / "13"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    exported = sweep_dir / "13_merged"  # a kasa-export folder put there: no job, failed or not (walk AQ)
    exported.mkdir()
    (exported / "kasa_export.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="kasa.analysis.sweep"):
        md = summarize_sweep(sweep_dir)
    assert any("12" in r.getMessage() and "summary.json" in r.getMessage() for r in caplog.records)
    assert any("13" in r.getMessage() for r in caplog.records)
    rows = _read_csv(sweep_dir / "sweep_summary.csv")
    assert sum(int(r["n"]) for r in rows) == 12
    assert "skipped (no usable summary.json): 2" in md.read_text()
    assert "- folders skipped: `12/`, `13/`" in md.read_text()  # folders, not counts


def test_a_failed_setting_is_an_empty_cell_of_the_heatmap(grid_sweep):
    """A 2 x 2 sweep whose beta=1e38 jobs failed was drawn as a 1 x 2 grid, the failed setting nowhere (walk AB)."""
    sweep_dir, scores = grid_sweep
    for job, gamma in enumerate(GAMMAS, start=12):  # failed before a summary: config.json only
        (sweep_dir / str(job) / ".hydra").mkdir(parents=True)
        (sweep_dir / str(job) / "config.json").write_text(json.dumps({"method": {"method": "kasa", "beta": 1e38,
                                                                                  "gamma": gamma}}))
    summarize_sweep(sweep_dir)
    [panel] = json.loads((sweep_dir / "heatmap.json").read_text())
    assert panel["beta"] == [*BETAS, 1e38] and panel["gamma"] == GAMMAS
    assert panel["median"][-1] == [None, None]


def test_single_column_heatmap_when_only_beta_varies(tmp_path):
    for job, (beta, seed) in enumerate((b, s) for b in BETAS for s in SEEDS):
        _write_run(tmp_path / str(job), beta=beta, gamma=1e-3, seed=seed, best=_score(beta, 1e-3, seed))
    summarize_sweep(tmp_path)
    assert len(_read_csv(tmp_path / "sweep_summary.csv")) == 2
    (grid,) = json.loads((tmp_path / "heatmap.json").read_text())
    assert grid["gamma"] == [1e-3] and grid["beta"] == sorted(BETAS)
    medians = [[np.median([_score(b, 1e-3, s) for s in SEEDS])] for b in sorted(BETAS)]
    assert np.allclose(grid["median"], medians)


def test_no_heatmap_when_neither_varies(tmp_path):
    for job, seed in enumerate(SEEDS):
        _write_run(tmp_path / str(job), beta=1e-4, gamma=1e-3, seed=seed, best=_score(1e-4, 1e-3, seed))
    summarize_sweep(tmp_path)
    assert (tmp_path / "sweep_summary.csv").is_file()
    assert not (tmp_path / "heatmap.png").exists()


def test_varying_overrides_become_setting_columns(tmp_path):
    """A swept trainer.lr is a setting column; constant overrides and the seed are not."""
    scores: dict[str, list[float]] = {}
    job = 0
    for lr in ("1e-4", "3e-4"):
        for seed in SEEDS:
            best = _score(float(lr), 0.5, seed)
            scores.setdefault(lr, []).append(best)
            overrides = [f"trainer.lr={lr}", f"seed={seed}", "trainer.epochs=3", "recipe=glue/roberta_base_cola"]
            _write_run(tmp_path / str(job), beta=1e-4, gamma=1e-3, seed=seed, best=best, overrides=overrides)
            job += 1
    summarize_sweep(tmp_path)
    rows = _read_csv(tmp_path / "sweep_summary.csv")
    assert list(rows[0])[:5] == ["method", "rank", "beta", "gamma", "trainer.lr"]
    assert "trainer.epochs" not in rows[0] and "seed" not in rows[0]
    for row in rows:
        assert float(row["median"]) == pytest.approx(np.median(scores[row["trainer.lr"]]))


def test_methods_split_heatmap_into_panels(tmp_path):
    job = 0
    for method in ("kasa", "kasa_l2"):
        for beta in BETAS:
            for gamma in GAMMAS:
                for seed in SEEDS[:2]:
                    _write_run(tmp_path / str(job), beta=beta, gamma=gamma, seed=seed,
                               best=_score(beta, gamma, seed) + (0.01 if method == "kasa" else 0.0), method=method,
                               overrides=[f"method={method}", f"seed={seed}"])
                    job += 1
    summarize_sweep(tmp_path)
    panels = json.loads((tmp_path / "heatmap.json").read_text())
    # kasa_l2 has no gamma term: its gamma is left out, so its runs form one setting per beta and no beta x gamma
    # panel of its own
    assert [p["title"] for p in panels] == ["method=kasa"]
    rows = _read_csv(tmp_path / "sweep_summary.csv")
    assert len(rows) == 4 + 2 and sorted(r["gamma"] for r in rows if r["method"] == "kasa_l2") == ["", ""]


def test_main_prints_the_table(grid_sweep, capsys):
    sweep_dir, _ = grid_sweep
    assert sweep_cli.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "| method | rank | beta | gamma |" in out
    with pytest.raises(SystemExit) as exit_:
        sweep_cli.main([str(sweep_dir / "missing")])
    assert exit_.value.code == 2


def test_a_single_run_folder_is_refused(tmp_path):
    """A run's folder is not a sweep: no summary lands among its files, and its checkpoints/ is not a crashed job."""
    run = tmp_path / "res2"
    _write_run(run, beta=1e-4, gamma=1e-3, seed=0, best=0.5)
    (run / "checkpoints" / "best").mkdir(parents=True)
    before = sorted(run.rglob("*"))
    result = run_cli("kasa.cli.sweep", str(run))
    assert_one_line_error(result, f"{run} is one run's folder, not a sweep's", f"kasa-compare {run}")
    assert "skipping" not in result.stderr
    assert sorted(run.rglob("*")) == before  # nothing written


def test_a_folder_without_runs_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    result = run_cli("kasa.cli.sweep", str(tmp_path))
    assert_one_line_error(result, f"{tmp_path} holds no sweep's runs", "hydra.sweep.dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    missing = run_cli("kasa.cli.sweep", str(tmp_path / "nope"))
    assert_one_line_error(missing, f"sweep directory {tmp_path / 'nope'} does not exist: pass a sweep's folder")


def test_a_run_without_summary_is_named_itself(tmp_path, caplog):
    """A run that has not finished is skipped under its own name, not its checkpoints/ subfolder's."""
    run = tmp_path / "lock"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints" / "last").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="kasa.analysis.sweep"):
        runs, skipped = sweep.load_runs(run)
    assert not runs and skipped == [run]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping {run}: no summary.json (still training, stopped, or failed)"]


def test_empty_sweep_still_writes_a_summary(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # a sweep none of whose jobs left a record
    md = summarize_sweep(tmp_path)
    assert "No finished run" in md.read_text()
    assert not (tmp_path / "heatmap.png").exists()


def _task_sweep(folder: Path, data_dir: str = "") -> dict[str, dict[float, list[float]]]:
    """`task=glue/cola,glue/rte method.beta=...`: CoLA scored by Matthews' correlation, RTE by accuracy (with
    `data_dir`, each task's files in <data_dir>/<task>, which then tells the panels apart too)."""
    scores: dict[str, dict[float, list[float]]] = {}
    job = 0
    for task, metric, offset in (("cola", "matthews", -0.4), ("rte", "accuracy", 0.0)):
        for beta in BETAS:
            for seed in SEEDS:
                best = _score(beta, 1e-3, seed) + offset
                scores.setdefault(task, {}).setdefault(beta, []).append(best)
                _write_run(folder / str(job), beta=beta, gamma=1e-3, seed=seed, best=best, task=task, metric=metric,
                           overrides=[f"task=glue/{task}", f"method.beta={beta}", f"seed={seed}",
                                      *([f"task.data_dir={data_dir}/{task}"] if data_dir else [])])
                job += 1
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    return scores


def test_a_sweep_over_tasks_gives_each_task_its_metric_and_best(tmp_path):
    """Medians of different tasks are of different metrics: one best per task and metric, the metric a column, and a
    heatmap panel per task labelled with its own metric (not one best and one colour bar of `accuracy, matthews`)."""
    scores = _task_sweep(tmp_path)
    text = summarize_sweep(tmp_path).read_text()
    assert "accuracy, matthews" not in text and "- tasks (metric): cola (matthews), rte (accuracy)" in text
    for task, metric in (("cola", "matthews"), ("rte", "accuracy")):
        beta, best = max(((b, np.median(v)) for b, v in scores[task].items()), key=lambda item: item[1])
        assert (f"- best median, {task} ({metric}): {best:.4f} (method=kasa, rank=8, beta={beta:g}, gamma=0.001; "
                "n=3)") in text
    assert text.count("- best median") == 2
    rows = _read_csv(tmp_path / "sweep_summary.csv")
    assert list(rows[0])[:6] == ["method", "rank", "beta", "gamma", "task", "metric"]
    assert {(r["task"], r["metric"]) for r in rows} == {("cola", "matthews"), ("rte", "accuracy")}
    panels = json.loads((tmp_path / "heatmap.json").read_text())
    assert [(p["title"], p["task"], p["metric"]) for p in panels] == [
        ("task=cola, metric=matthews", "cola", "matthews"), ("task=rte, metric=accuracy", "rte", "accuracy")]


@pytest.mark.parametrize("tasks", [False, True, "long titles"])
def test_the_heatmaps_texts_do_not_overlap(tmp_path, monkeypatch, tasks):
    """The figure's title clear of the panels' titles, and each panel (its tick labels, axis labels, title) clear of
    the other panels and the colour bars: one panel, and one per task, each with its own colour bar (and titles
    that name each task's data folder, wrapped to their panel)."""
    from matplotlib.figure import Figure

    if tasks:
        _task_sweep(tmp_path, "/work/shared/data/glue" if tasks == "long titles" else "")
    else:
        for job, (beta, gamma, seed) in enumerate((b, g, s) for b in BETAS for g in GAMMAS for s in SEEDS):
            _write_run(tmp_path / str(job), beta=beta, gamma=gamma, seed=seed, best=_score(beta, gamma, seed))
    overlaps: list[str] = []

    def savefig(fig, *args, **kwargs):
        original(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        names = [ax.get_title() or ax.get_ylabel() for ax in fig.axes]  # the panels, then the colour bars
        assert len(fig.axes) == (4 if tasks else 2), names
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
        title = fig._suptitle.get_window_extent(renderer)
        overlaps.extend(f"the figure's title and {names[i]}" for i, box in enumerate(boxes) if title.overlaps(box))
        overlaps.extend(f"{names[i]} and {names[j]}" for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                        if boxes[i].overlaps(boxes[j]))

    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", savefig)
    summarize_sweep(tmp_path)
    assert (tmp_path / "heatmap.png").is_file() and not overlaps


@pytest.mark.parametrize("overrides, lrs", [
    (["trainer.lr=3e-3", "trainer.lr=0.003", "trainer.lr=3E-3"], [0.003, 0.003, 0.003]),  # one value, three spellings
    (["trainer.lr=4e-4", None, None], [0.0004, 0.0004, 0.0004]),  # the default, given once and left out twice
])
def test_one_setting_spelled_or_defaulted_differently_is_one_row(tmp_path, overrides, lrs):
    """The summary compared the overrides' text: `trainer.lr=3e-3` and `trainer.lr=0.003` made two rows of n=1 where
    kasa-compare pooled them; the value each run resolved (config.json) is what tells settings apart."""
    for seed, (override, lr) in enumerate(zip(overrides, lrs)):
        run = tmp_path / str(seed)
        _write_run(run, beta=1e-4, gamma=1e-3, seed=seed, best=0.5 + seed / 10,
                   overrides=[f"seed={seed}", *([override] if override else [])])
        (run / "config.json").write_text(json.dumps({"trainer": {"lr": lr}, "seed": seed}))
    runs, _ = sweep.load_runs(tmp_path)
    keys = sweep.setting_keys(runs)
    assert "trainer.lr" not in keys
    [row] = sweep.summarize(runs, keys)
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2]


def test_a_row_that_pools_runs_of_one_seed_is_named(tmp_path, caplog):
    """method=lora with a beta sweep repeats one run; the summary counted it as n=2 with a std of 0, silently."""
    for number, beta in enumerate((1e-4, 1e-2)):
        _write_run(tmp_path / str(number), beta=beta, gamma=1e-3, seed=0, best=0.42, method="lora",
                   overrides=["method=lora", f"method.beta={beta}", "seed=0"])
    runs, _ = sweep.load_runs(tmp_path)
    with caplog.at_level(logging.WARNING):
        [row] = sweep.summarize(runs, sweep.setting_keys(runs))
    assert row["n"] == 2
    assert "method=lora" in caplog.text and "pools runs with the same seed [0]" in caplog.text
