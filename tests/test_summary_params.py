"""summary.json names its parameter counts for what they are, and the console says "trained parameters" for the
methods that train the model's own weights (full, bitfit) instead of calling them adapter parameters."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from cli_helpers import tiny_run_config


def test_full_fine_tuning_reports_trained_parameters(tmp_path, capsys, monkeypatch):
    from kasa.training.loop import train

    monkeypatch.setenv("COLUMNS", "40")  # the width rich assumes off a terminal (80 without it)

    cfg = tiny_run_config(tmp_path)
    cfg.method.method = "full"
    train(cfg, dataclasses.asdict(cfg))
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert "trainable_params" not in summary  # the old, ambiguous name
    without_head, with_head = summary["trainable_params_without_head"], summary["trainable_params_with_head"]
    # BERT's head here: the pooler (32 x 32 + 32) and the classifier (2 x 32 + 2)
    assert with_head - without_head == 32 * 32 + 32 + 2 * 32 + 2
    lines = capsys.readouterr().err.splitlines()
    output = "\n".join(lines)
    assert f"full: {without_head:,} trained parameters, {with_head:,} trainable of" in output
    assert "adapter parameters" not in output
    # one line however long: a log file's lines were wrapped at 80 columns, "..., 179 \ns"
    assert any(re.fullmatch(rf"best .*, {without_head:,} trained parameters without the head, \d+ s", line)
               for line in lines)
