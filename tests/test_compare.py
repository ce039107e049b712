"""kasa-compare on fake run directories (no training), and the ablation recipe's sweep run for real on a tiny BERT."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli, write_tsv
from kasa.cli.compare import main as compare_main
from kasa.cli.plot import main as plot_main
from kasa.analysis import compare
from kasa.analysis.compare import build_table, collect_runs, format_params

TASKS = {"mrpc": "accuracy", "cola": "matthews", "rte": "accuracy"}
PARAMS = {"lora": 294_912, "pissa": 294_912, "kasa": 295_104, "full": 124_647_170}
SEEDS = [0, 1, 2, 3, 4]


def score(method: str, task: str, seed: int) -> float:
    """Irregular scores, so the median is neither the mean nor a fixed seed's value by accident."""
    rng = np.random.default_rng(zlib.crc32(f"{method}/{task}".encode()) + seed)
    return float(0.5 + 0.4 * rng.random())


def write_run(directory: Path, *, task: str, method: str, seed: int, best: float, rank: int = 8, **extra) -> None:
    directory.mkdir(parents=True)
    (directory / ".hydra").mkdir()
    (directory / "checkpoints" / "best").mkdir(parents=True)
    summary = {"task": task, "method": method, "metric": TASKS.get(task, "accuracy"), "best": best, "best_epoch": 2,
               "last": best - 0.01, "trainable_params": PARAMS.get(method, 1000), "seed": seed, "rank": rank,
               "beta": 1e-4, "gamma": 1e-3, "overrides": [f"method={method}", f"seed={seed}"]}
    summary.update(extra)
    (directory / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path):
    """Two sweep folders (MRPC + CoLA; RTE) in Hydra's layout, pissa without RTE, and a crashed job."""
    scores: dict[tuple[str, str], list[float]] = {}
    for sweep, tasks in (("sweep_a", ["mrpc", "cola"]), ("sweep_b", ["rte"])):
        job = 0
        for task in tasks:
            for method in ("lora", "pissa", "kasa"):
                if method == "pissa" and task == "rte":
                    continue
                for seed in SEEDS:
                    best = score(method, task, seed)
                    scores.setdefault((method, task), []).append(best)
                    write_run(tmp_path / sweep / str(job), task=task, method=method, seed=seed, best=best)
                    job += 1
    (tmp_path / "sweep_b" / "99" / ".hydra").mkdir(parents=True)  # a crashed job: no summary.json
    return tmp_path, scores


def test_cells_are_medians_and_average_is_their_mean(runs):
    root, scores = runs
    table, files = compare.compare([root / "sweep_a", root / "sweep_b"], out=root / "out", scale=100)
    assert [r.method for r in table.rows] == ["lora", "pissa", "kasa"]  # the paper's order: KaSA last
    assert table.columns == [("mrpc", "accuracy"), ("cola", "matthews"), ("rte", "accuracy")]
    with files["csv"].open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    for method in ("lora", "pissa", "kasa"):
        medians = []
        for task, metric in TASKS.items():
            if (method, task) not in scores:
                assert rows[method][f"{task}:{metric}"] == "" and rows[method][f"{task}:{metric} n"] == "0"
                continue
            expected = 100 * np.median(scores[(method, task)])
            assert float(rows[method][f"{task}:{metric}"]) == pytest.approx(expected, abs=1e-9)
            assert rows[method][f"{task}:{metric} n"] == "5"
            medians.append(expected)
        if len(medians) == 3:
            assert float(rows[method]["average"]) == pytest.approx(np.mean(medians), abs=1e-9)
        else:
            assert rows[method]["average"] == ""  # a row without every task has no average
        assert int(rows[method]["trainable_params_without_head"]) == PARAMS[method]  # read from the old key


def test_best_of_each_column_is_bold(runs):
    root, scores = runs
    table, files = compare.compare([root], out=root / "out", scale=100)
    markdown = files["markdown"].read_text().splitlines()
    latex = files["latex"].read_text()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in markdown[2:5]]
    lines = {row[0]: row for row in cells}
    assert set(lines) == {"LoRA", "PiSSA", "KaSA"}
    names = {"lora": "LoRA", "pissa": "PiSSA", "kasa": "KaSA"}
    for column, task in enumerate(TASKS, start=2):
        present = {m: round(100 * np.median(v), 1) for (m, t), v in scores.items() if t == task}
        top = max(present.values())
        for method, value in present.items():
            cell = lines[names[method]][column]
            assert cell == (f"**{value:.1f}**" if value == top else f"{value:.1f}")
            assert (f"\\textbf{{{value:.1f}}}" in latex) or value != top
    averages = {m: round(np.mean([100 * np.median(scores[(m, t)]) for t in TASKS]), 1) for m in ("lora", "kasa")}
    best = max(averages, key=averages.get)
    assert lines[names[best]][-1] == f"**{averages[best]:.1f}**"
    assert lines["PiSSA"][-1] == ""
    assert lines["KaSA"][1] == "0.30M"  # two decimals: LoRA's different count is 0.3M too at one
    assert latex.count("\\textbf") == len(table.bold())
    assert "\\# Trainable Parameters" in latex and latex.startswith("\\begin{tabular}")


def test_ties_are_all_bold(tmp_path):
    for job, (method, best) in enumerate((("lora", 0.9), ("kasa", 0.9), ("pissa", 0.8))):
        write_run(tmp_path / str(job), task="mrpc", method=method, seed=0, best=best)
    table = build_table(collect_runs([tmp_path])[0], scale=100)
    assert table.bold() == {(0, "mrpc:accuracy"), (2, "mrpc:accuracy"), (0, "average"), (2, "average")}


def test_rows_split_by_rank_and_by_keys(tmp_path):
    job = 0
    for rank in (4, 8):
        for beta in (0.1, 0.01):
            for seed in (0, 1):
                write_run(tmp_path / str(job), task="rte", method="kasa", seed=seed, best=0.5 + rank / 100 + beta,
                          rank=rank, beta=beta)
                job += 1
    table = build_table(collect_runs([tmp_path])[0], by=["beta"])
    assert [r.label for r in table.rows] == ["KaSA r=4, beta=0.01", "KaSA r=4, beta=0.1", "KaSA r=8, beta=0.01",
                                             "KaSA r=8, beta=0.1"]
    assert [r.cells[("rte", "accuracy")].median for r in table.rows] == pytest.approx([0.55, 0.64, 0.59, 0.68])


def test_a_cell_pooling_runs_of_different_settings_is_named(tmp_path, caplog):
    """Two seeds with different learning rates were shown as one "median over seeds" without a word."""
    for job, lr in enumerate(("1e-3", "1e-2")):
        write_run(tmp_path / str(job), task="rte", method="kasa", seed=job, best=0.5 + job / 10,
                  overrides=["method=kasa", f"seed={job}", f"trainer.lr={lr}"])
    with caplog.at_level("WARNING"):
        build_table(collect_runs([tmp_path])[0])
    assert "KaSA on rte pools 2 runs that differ in trainer.lr: pass --by" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_table(collect_runs([tmp_path])[0], by=["trainer.lr"])
    assert not caplog.text


def test_rows_by_a_list_setting_and_no_average_over_a_task_twice(tmp_path, caplog):
    """--by model.target_modules (the key the pooling warning names) crashed on the list; a task scored in two
    metrics was averaged as two tasks."""
    for job, targets in enumerate((["query", "value"], ["query", "key", "value"])):
        write_run(tmp_path / str(job), task="sst2", method="lora", seed=0, best=0.7 + job / 10)
        (tmp_path / str(job) / "config.json").write_text(json.dumps({"model": {"target_modules": targets}}))
    write_run(tmp_path / "mcc", task="sst2", method="lora", seed=1, best=0.2, metric="matthews")
    table = build_table(collect_runs([tmp_path])[0], by=["model.target_modules"])
    assert table.columns == [("sst2", "accuracy"), ("sst2", "matthews")]
    cells = {row.label: {c: cell.median for c, cell in row.cells.items()} for row in table.rows}
    assert cells['LoRA model.target_modules=["query", "value"]'] == {("sst2", "accuracy"): 0.7}
    assert cells['LoRA model.target_modules=["query", "key", "value"]'] == {("sst2", "accuracy"): pytest.approx(0.8)}
    assert all(table.average(row) is None for row in table.rows)
    assert "none here: a task is scored in several metrics" in compare.to_markdown(table)


def test_a_single_run_directory_and_a_model_column(tmp_path):
    write_run(tmp_path / "a", task="rte", method="kasa", seed=0, best=0.8)
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model": {"name": "FacebookAI/roberta-base"}}))
    write_run(tmp_path / "b", task="rte", method="kasa", seed=0, best=0.7)
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model": {"name": "FacebookAI/roberta-large"}}))
    runs = collect_runs([tmp_path / "a", tmp_path / "b", tmp_path])[0]  # overlapping inputs: each run once
    assert len(runs) == 2
    table = build_table(runs)
    assert [r.label for r in table.rows] == ["roberta-base (KaSA)", "roberta-large (KaSA)"]


@pytest.mark.parametrize("count, text", [(0, "0"), (294_912, "0.3M"), (124_647_170, "124.6M"), (98_304, "0.098M"),
                                         (1_056, "0.0011M")])
def test_parameter_counts_print_like_the_paper(count, text):
    assert format_params(count) == text


@pytest.mark.parametrize("counts, texts", [((3_407_872, 3_409_024), ("3.408M", "3.409M")),
                                           ((73_728, 73_824), ("0.0737M", "0.0738M")),
                                           ((73_728, 73_729), ("0.073728M", "0.073729M"))])
def test_different_parameter_counts_print_differently(counts, texts):
    """MiniLM's LoRA and KaSA counts (73,728, 73,824) both printed 0.074M, whatever the decimals (walk AB)."""
    from kasa.analysis.compare import params_decimals

    decimals = params_decimals(counts)
    assert tuple(format_params(count, decimals) for count in counts) == texts


def test_cli_writes_three_files_and_prints_the_table(runs, capsys):
    root, _ = runs
    assert compare_main([str(root), "--metric-scale", "100", "--out", str(root / "table"), "--decimals", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| Method | # Trainable Parameters | MRPC (Acc.) | CoLA (Mcc.) | RTE (Acc.) | Avg. |")
    for name in ("comparison.md", "comparison.csv", "comparison.tex"):
        assert (root / "table" / name).is_file()
    assert "runs per cell: 5 (8 cells)" in (root / "table" / "comparison.md").read_text()
    # the crashed job, which only a warning named (walk AB): the cells hold fewer runs than the sweep has jobs
    assert (f"Skipped, without a result (failed, stopped or still training): `{root / 'sweep_b' / '99'}`"
            in (root / "table" / "comparison.md").read_text())
    # --plots over runs that no sweep plot fits (lora, pissa and kasa at one rank) says so instead of nothing
    assert compare_main([str(root), "--out", str(root / "table"), "--plots"]) == 0
    assert "no plot: the runs hold no ablation" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path):
    result = run_cli("kasa.cli.compare", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no finished run")


@pytest.mark.parametrize("option, message", [
    (["--decimals", "-1"], "--decimals must be >= 0"),  # was Python's "Format specifier missing precision"
    (["--metric-scale", "0"], "--metric-scale must be > 0"),  # was a table of zeros
])
def test_cli_refuses_a_bad_option(runs, option, message):
    root, _ = runs
    result = run_cli("kasa.cli.compare", str(root), "--out", str(root / "table"), *option)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert not (root / "table").exists()


@pytest.mark.parametrize("module", ["kasa.cli.compare", "kasa.cli.plot"])
def test_a_key_value_option_points_at_the_flags(runs, module):
    """kasa-eval's and kasa-export's style (output=DIR) is refused with the flag that takes it, before anything."""
    root, _ = runs
    result = run_cli(module, str(root), f"output={root / 'table'}")
    assert result.returncode == 2
    prog = "kasa-compare" if module.endswith("compare") else "kasa-plot"
    assert result.stderr.strip().splitlines() == [  # one line (argparse's usage block above it left out)
        f"error: argument dirs: 'output={root / 'table'}' is not a folder; options here are flags (--out DIR, "
        f"--metric-scale 100, ...), not key=value (usage: {prog} --help)"]
    assert not (root / "table").exists()


def test_ablation_recipe_sweeps_the_ladder(tiny_model, tmp_path):
    """`kasa-train --multirun recipe=ablation/roberta_base_mrpc` runs lora .. kasa from the recipe's sweeper
    parameters (seed narrowed on the command line), then kasa-plot and kasa-compare read the sweep."""
    words = ["the movie was good", "the food was bad", "the place was fine", "the service was awful"]
    rows = [[a, b, int(i % 2 == j % 2)] for i, a in enumerate(words) for j, b in enumerate(words)]
    write_tsv(tmp_path / "mrpc" / "train.tsv", ["sentence1", "sentence2", "label"], rows)
    write_tsv(tmp_path / "mrpc" / "dev.tsv", ["sentence1", "sentence2", "label"], rows[::2])
    sweep = tmp_path / "sweep"
    result = run_cli("kasa.cli.train", "--multirun", "recipe=ablation/roberta_base_mrpc", f"model.path={tiny_model}",
                     f"task.data_dir={tmp_path / 'mrpc'}", f"hydra.sweep.dir={sweep}", "trainer.epochs=1",
                     "trainer.max_length=16", "logging.progress=false", "method.svd_cache_dir=null", "seed=0")
    assert result.returncode == 0, result.stderr[-3000:]
    methods = [json.loads((sweep / str(i) / "summary.json").read_text())["method"] for i in range(5)]
    assert methods == ["lora", "svd_lora", "kasa_sv", "kasa_l2", "kasa"]
    assert not (sweep / "5").exists()
    assert plot_main([str(sweep)]) == 0
    data = json.loads((sweep / "ablation.json").read_text())
    assert data["tasks"]["mrpc"]["methods"] == methods
    assert (sweep / "ablation.png").is_file()
    table, _ = compare.compare([sweep])
    assert [r.method for r in table.rows] == methods and table.rows[-1].params == 4 * (2 * 32 * 8 + 8)


def test_a_run_without_summary_is_named_itself(tmp_path):
    """A run folder without summary.json (still training, or failed) is named as passed, not its checkpoints/."""
    run = tmp_path / "lock"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints" / "last").mkdir(parents=True)
    result = run_cli("kasa.cli.compare", str(run))
    assert f"skipping {run}: no summary.json" in result.stderr
    assert "checkpoints" not in result.stderr


def test_a_by_key_no_run_has_is_refused(tmp_path):
    """A --by typo was silently ignored (the runs pooled as without --by): refused, naming the keys that would split."""
    for job, lr in enumerate(("1e-3", "1e-4")):
        write_run(tmp_path / "grid" / str(job), task="rte", method="kasa", seed=0, best=0.5 + job / 10,
                  overrides=["method=kasa", "seed=0", f"trainer.lr={lr}"])
    result = run_cli("kasa.cli.compare", str(tmp_path / "grid"), "--by", "trainer.lrr", "--out", str(tmp_path / "t"))
    assert_one_line_error(result, "no compared run has the setting --by trainer.lrr", ": trainer.lr")
    assert not (tmp_path / "t").exists()
    for job, lr in enumerate((1e-3, 1e-4)):  # a config.json, as every run writes: trainer is a section of it
        (tmp_path / "grid" / str(job) / "config.json").write_text(json.dumps({"trainer": {"lr": lr, "epochs": 3}}))
    result = run_cli("kasa.cli.compare", str(tmp_path / "grid"), "--by", "trainer", "--out", str(tmp_path / "t"))
    assert_one_line_error(result, "--by trainer is a section of the config, not a setting: pass one of its settings (",
                          "trainer.lr")  # it raised TypeError: unhashable type 'dict'
    assert not (tmp_path / "t").exists()
    result = run_cli("kasa.cli.compare", str(tmp_path / "grid"), "--by", "trainer.lr,trainer.epochs", "--out",
                     str(tmp_path / "t"))  # it said no run has the setting "trainer.lr,trainer.epochs" (walk AQ)
    assert_one_line_error(result, "--by takes one setting; repeat it for several: --by trainer.lr --by trainer.epochs")
    result = run_cli("kasa.cli.compare", str(tmp_path / "grid"), "--by", "trainer.lr", "--out", str(tmp_path / "t"))
    assert result.returncode == 0 and "KaSA trainer.lr=0.0001" in result.stdout


def test_out_naming_a_file_is_one_line(runs, tmp_path):
    folder, _ = runs
    (tmp_path / "notes.txt").write_text("mine")
    for module in ("kasa.cli.compare", "kasa.cli.plot"):
        result = run_cli(module, str(folder / "sweep_a"), "--out", str(tmp_path / "notes.txt"))
        assert_one_line_error(result, "--out", "notes.txt is a file, not a folder: pass a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_rows_by_process_count(tmp_path):
    """Runs on 1 and 2 processes (the same batch_size, twice the global batch) could not be told apart."""
    for job, processes in enumerate((1, 2, 1, 2)):
        write_run(tmp_path / str(job), task="rte", method="kasa", seed=job // 2, best=0.5 + processes / 10,
                  processes=processes)
    table = build_table(collect_runs([tmp_path])[0], by=["processes"])
    assert [(r.label, r.cells[("rte", "accuracy")].n) for r in table.rows] == [("KaSA processes=1", 2),
                                                                              ("KaSA processes=2", 2)]


def test_a_table_of_two_models_lists_each_models_rows_together_and_bolds_per_model(tmp_path):
    """As the paper's tables 1-3: the RoBERTa-base rows, then the RoBERTa-large ones, the best of each model bold
    (the larger model's rows won every column, so the base model's best was never marked, and the rows alternated)."""
    for model, offset in (("FacebookAI/roberta-large", 0.02), ("FacebookAI/roberta-base", 0.0)):
        for method, best, params in (("kasa", 0.66, 295_104), ("lora", 0.63, 294_912)):
            run = tmp_path / f"{model.split('/')[1]}-{method}"
            write_run(run, task="cola", method=method, seed=0, best=best + offset)
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps(summary | {"trainable_params_without_head": params}))
            (run / "config.json").write_text(json.dumps({"model": {"name": model}}))
    table = build_table(collect_runs([tmp_path])[0], scale=100)
    assert [r.label for r in table.rows] == ["roberta-base (LoRA)", "roberta-base (KaSA)", "roberta-large (LoRA)",
                                             "roberta-large (KaSA)"]
    assert table.bold() == {(1, "cola:matthews"), (1, "average"), (3, "cola:matthews"), (3, "average")}
    assert [table.params_text(r) for r in table.rows] == ["0.29M", "0.30M"] * 2  # 0.3M both at the paper's 1 decimal


def test_the_judge_score_is_not_a_fraction(tmp_path, capsys):
    """--metric-scale 100 printed an LLM judge's mean score of 7 as 700.0 (walk AP); table 2 prints it as it is,
    beside accuracies x 100."""
    for seed, judged in enumerate((7.0, 7.5, 6.5)):
        write_run(tmp_path / "alpaca" / str(seed), task="alpaca", method="kasa", seed=seed, best=judged,
                  metric="judge_score")
        write_run(tmp_path / "rte" / str(seed), task="rte", method="kasa", seed=seed, best=0.7)
    table = build_table(collect_runs([tmp_path])[0], scale=100)
    assert [table.value(table.rows[0], c) for c in table.columns] == pytest.approx([70.0, 7.0])  # rte, alpaca
    assert compare_main([str(tmp_path), "--metric-scale", "100", "--out", str(tmp_path / "table")]) == 0
    printed = capsys.readouterr().out
    assert "**7.00**" in printed and "**70.0**" in printed and "(judge_score unscaled)" in printed


def test_all_metrics_gives_a_column_per_metric_of_the_best_epoch(tmp_path, capsys):
    """Table 12's five E2E metrics and table 3's sets: --all-metrics takes every metric of each run's best epoch,
    in the order the evaluation reports them; the main metric alone otherwise."""
    for seed, bleu in enumerate((0.60, 0.70, 0.65)):
        history = [{"type": "eval", "epoch": 1, "step": 5, "split": "test", "BLEU": 0.1, "NIST": 1.0, "METEOR": 0.1,
                    "ROUGE_L": 0.1, "CIDEr": 0.1},
                   {"type": "eval", "epoch": 2, "step": 10, "split": "test", "BLEU": bleu, "NIST": 8.0 + seed,
                    "METEOR": 0.45, "ROUGE_L": 0.7, "CIDEr": 2.0}]
        write_run(tmp_path / str(seed), task="e2e", method="kasa", seed=seed, best=bleu, metric="BLEU",
                  eval_history=history)
    runs = collect_runs([tmp_path])[0]
    assert build_table(runs).columns == [("e2e", "BLEU")]
    table = build_table(runs, all_metrics=True)
    assert table.columns == [("e2e", m) for m in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")]
    assert [table.value(table.rows[0], c) for c in table.columns] == pytest.approx([0.65, 9.0, 0.45, 0.7, 2.0])
    assert compare_main([str(tmp_path), "--all-metrics", "--out", str(tmp_path / "table")]) == 0
    assert "| E2E (BLEU) | E2E (NIST) | E2E (METEOR) |" in capsys.readouterr().out
    # table 12: BLEU, METEOR, ROUGE-L x 100 beside NIST and CIDEr as they are (all x 100 gave NIST 900.0, walk AO)
    scaled = build_table(runs, scale=100, all_metrics=True)
    assert [scaled.value(scaled.rows[0], c) for c in scaled.columns] == pytest.approx([65.0, 9.0, 45.0, 70.0, 2.0])
    assert compare_main([str(tmp_path), "--all-metrics", "--metric-scale", "100", "--out", str(tmp_path / "x")]) == 0
    printed = capsys.readouterr().out
    assert "| **65.0** | **9.00** | **45.0** | **70.0** | **2.00** |" in printed
    assert "x 100 (CIDEr, NIST unscaled)" in printed and "| E2E (ROUGE-L) |" in printed  # table 12's names
