"""summary.json names its parameter counts for what they are, and the console says "trained parameters" for the
methods that train the model's own weights (full, bitfit) instead of calling them adapter parameters."""

from __future__ import annotations

import json

from cli_helpers import make_tiny_bert, run_cli, train_args, write_sentiment_data


def test_full_fine_tuning_reports_trained_parameters(tmp_path):
    model = make_tiny_bert(tmp_path / "bert")
    run_dir = tmp_path / "full"
    result = run_cli("kasa.cli.train", *train_args(model, write_sentiment_data(tmp_path / "data"), run_dir,
                                                   "method=full", "trainer.epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "trainable_params" not in summary  # the old, ambiguous name
    without_head, with_head = summary["trainable_params_without_head"], summary["trainable_params_with_head"]
    # BERT's head here: the pooler (32 x 32 + 32) and the classifier (2 x 32 + 2)
    assert with_head - without_head == 32 * 32 + 32 + 2 * 32 + 2
    output = result.stdout + result.stderr
    assert f"full: {without_head:,} trained parameters, {with_head:,} trainable of" in output
    assert "adapter parameters" not in output
    assert f"{without_head:,} trained parameters without the head" in output
