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
    assert summary["processes"] == 1  # what tells a DDP run's global batch from one process's
    scores = [r[summary["metric"]] for r in evals]
    assert summary["best_epoch"] == 1 + scores.index(summary["best"])
    printed = re.search(r"best \w+ [-\d.]+ \(epoch (\d+)\)", result.stdout + result.stderr)
    assert printed and int(printed.group(1)) == summary["best_epoch"]


def test_progress_off_a_terminal_is_a_line_per_logging_step(tmp_path, capsys):
    """A log file (nohup, SLURM) got no progress at all: a plain line per logged step instead of the bar, whose epoch
    count is what max_steps leaves of trainer.epochs (the tiny set is 4 steps an epoch: 6 steps end in epoch 2)."""
    import dataclasses

    from cli_helpers import tiny_run_config
    from kasa.training.loop import train

    cfg = tiny_run_config(tmp_path)
    cfg.trainer.epochs, cfg.trainer.max_steps, cfg.trainer.log_every = 3, 6, 2
    cfg.logging.progress = True
    train(cfg, dataclasses.asdict(cfg))
    err = capsys.readouterr().err
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [f"step {r['step']}/6 epoch {r['epoch'] + 1}/2 loss {r['loss']:.4f} lr {r['lr']:.3g}"
                for r in logged if r["type"] == "train"]
    assert [r.split(" epoch")[0] for r in expected] == ["step 2/6", "step 4/6", "step 6/6"]
    assert [line for line in err.splitlines() if line.startswith("step ")] == expected


def test_progress_on_a_terminal_is_the_bar(monkeypatch, capsys):
    """On a terminal the bar shows the epoch and loss, with no plain lines beside it."""
    from kasa.training.console import Console

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich takes stderr for a terminal
    console = Console()
    assert console.interactive
    bar = console.progress(6, epochs=2)
    assert bar.logged({"step": 2, "epoch": 0, "loss": 0.5, "lr": 1e-3}) == "epoch 1/2 loss 0.5000"
    bar.advance("epoch 1/2 loss 0.5000")
    bar.close()
    assert "step 2/6" not in capsys.readouterr().err


def test_console_lines_are_printed_as_they_are(capsys):
    """Brackets in a message (a path, a split name, a list, an error's text) are text, not rich markup: `[validation]`
    vanished as a style and a `[/x]` raised MarkupError."""
    from kasa.training.console import Console

    message = "skipping runs/[exp1]/step-3 [validation] [x=1] ['a', 'b'] [/tmp/a]: [bold]kept"
    Console().print(message)
    assert capsys.readouterr().err.splitlines() == [message]


def test_the_logged_learning_rate_is_the_one_the_step_used(tmp_path):
    """It was the next step's (the schedule had moved on when the losses were logged): 0.0075 for a first step at
    0.01, and 0 for the last."""
    import dataclasses

    from cli_helpers import tiny_run_config
    from kasa.training.loop import train

    cfg = tiny_run_config(tmp_path)
    cfg.trainer.lr, cfg.trainer.warmup_ratio, cfg.trainer.max_steps, cfg.trainer.log_every = 0.01, 0.0, 4, 1
    train(cfg, dataclasses.asdict(cfg))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if r["type"] == "train"] == [0.01, 0.0075, 0.005, 0.0025]  # linear decay to 0


def test_a_run_with_no_defined_score_has_no_best_in_valid_json(tmp_path, monkeypatch, capsys):
    """Every evaluation undefined (a nan Pearson): summary.json said best nan (a bare NaN, not JSON) at epoch 1, where
    the README promises best_epoch null; best/ still holds a checkpoint for kasa-eval."""
    import dataclasses

    import pytest

    from cli_helpers import tiny_run_config
    from kasa.training.loop import train

    monkeypatch.setattr("kasa.training.loop.main_metric", lambda metrics, name: float("nan"))
    cfg = tiny_run_config(tmp_path)
    cfg.trainer.epochs = 2
    train(cfg, dataclasses.asdict(cfg))

    def no_constants(name):
        pytest.fail(f"summary.json holds {name}, which is not JSON")

    summary = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=no_constants)
    assert summary["best"] is None and summary["best_epoch"] is None and summary["last"] is None
    assert (tmp_path / "run" / "checkpoints" / "best").is_dir()
    assert f"no epoch gave a defined {summary['metric']}" in capsys.readouterr().err
