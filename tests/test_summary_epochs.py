"""summary.json and the console count epochs alike, from 1 (`best_epoch`, eval_history, epochs_run); metrics.jsonl's
`epoch` field stays the 0-based index of the epoch."""

from __future__ import annotations

import json
import re

from cli_helpers import make_tiny_bert, run_cli, train_args, write_sentiment_data


def test_summary_and_console_count_epochs_from_one(tmp_path):
    model, data, run_dir = make_tiny_bert(tmp_path / "bert"), write_sentiment_data(tmp_path / "data"), tmp_path / "run"
    result = run_cli("kasa.cli.train", *train_args(model, data, run_dir, "method.rank=2", "trainer.epochs=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1]  # the index, as logged
    assert [r["epoch"] for r in summary["eval_history"]] == [1, 2] and summary["epochs_run"] == 2
    scores = [r[summary["metric"]] for r in evals]
    assert summary["best_epoch"] == 1 + scores.index(summary["best"])
    printed = re.search(r"best \w+ [-\d.]+ \(epoch (\d+)\)", result.stdout + result.stderr)
    assert printed and int(printed.group(1)) == summary["best_epoch"]
