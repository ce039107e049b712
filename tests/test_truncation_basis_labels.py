"""kasa-compare and kasa-plot's ablation bars tell KaSA runs truncated in the weight basis (the paper's; also runs
saved before method.truncation_basis existed) from runs truncated in the activation basis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kasa.analysis.compare import build_table, collect_runs
from kasa.analysis.plots import ablation


def _run(directory: Path, method: str, seed: int, best: float, basis: str | None) -> None:
    directory.mkdir(parents=True)
    summary = {"task": "rte", "method": method, "metric": "accuracy", "best": best, "seed": seed, "rank": 8,
               "trainable_params_without_head": 1000, "beta": 1e-4, "gamma": 1e-3, "overrides": []}
    (directory / "summary.json").write_text(json.dumps(summary))
    config = {"method": {"method": method, "rank": 8}}
    if basis is not None:  # None: a run saved before the setting existed
        config["method"]["truncation_basis"] = basis
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture
def sweep(tmp_path):
    scores = {("lora", None): [0.60, 0.62], ("svd_lora", "weight"): [0.55, 0.57], ("kasa", None): [0.70, 0.74],
              ("kasa", "activation"): [0.80, 0.84]}
    job = 0
    for (method, basis), values in scores.items():
        for seed, best in enumerate(values):
            _run(tmp_path / str(job), method, seed, best, basis)
            job += 1
    return tmp_path


def test_compare_rows_per_truncation_basis(sweep):
    table = build_table(collect_runs([sweep])[0])
    rows = {row.label: row for row in table.rows}
    assert list(rows) == ["LoRA", "SVD + LoRA", "KaSA", "KaSA (activation)"]
    assert rows["KaSA"].cells[("rte", "accuracy")].median == pytest.approx(0.72)
    assert rows["KaSA (activation)"].cells[("rte", "accuracy")].median == pytest.approx(0.82)
    assert rows["KaSA (activation)"].setting == {"method.truncation_basis": "activation"}


def test_ablation_bars_per_truncation_basis(sweep, tmp_path):
    data = ablation([sweep], tmp_path / "plots")
    bars = data["tasks"]["rte"]
    # the rungs that ran, and the hatched variant; rungs 3 and 4 ran nowhere and were listed all the same (walk AM)
    assert [name.split(":")[0] for name in data["legend"]] == ["1", "2", "5", "5*"]
    assert bars["labels"] == ["LoRA", "SVD + LoRA", "KaSA", "KaSA (activation)"]
    assert bars["median"] == pytest.approx([0.61, 0.56, 0.72, 0.82])
    assert bars["ladder_steps"] == [1, 2, 5, 5]
    assert (tmp_path / "plots" / "ablation.png").is_file()
