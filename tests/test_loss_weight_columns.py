"""Sweep and comparison tables show beta and gamma only for the methods whose loss has such a term
(kasa.adapters.config.LOSS_WEIGHTS), and read the parameter count under its new and its old summary key."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kasa.adapters.config import METHODS, AdapterConfig, has_loss_weight
from kasa.analysis import compare
from kasa.analysis.sweep import summarize_sweep


def write_run(directory: Path, method: str, beta: float, gamma: float, seed: int, best: float, **extra) -> None:
    directory.mkdir(parents=True)
    (directory / ".hydra").mkdir()
    summary = {"task": "cola", "method": method, "metric": "matthews", "best": best, "best_epoch": 0, "seed": seed,
               "rank": 8, "beta": beta, "gamma": gamma, "trainable_params_without_head": 1000,
               "overrides": [f"method={method}", f"method.beta={beta}", f"method.gamma={gamma}", f"seed={seed}"]}
    summary.update(extra)
    (directory / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def mixed_sweep(tmp_path: Path) -> Path:
    """lora, kasa_l2 and kasa, each at two betas and two gammas, seeds 0 and 1 (Hydra's numbered job folders)."""
    job = 0
    for method in ("lora", "kasa_l2", "kasa"):
        for beta in (1e-4, 1e-2):
            for gamma in (1e-3, 1e-1):
                for seed in (0, 1):
                    write_run(tmp_path / str(job), method, beta, gamma, seed, best=0.5 + 0.01 * job)
                    job += 1
    return tmp_path


def test_only_kasa_and_kasa_l2_have_loss_weights():
    assert {m for m in METHODS if has_loss_weight(m, "beta")} == {"kasa", "kasa_l2"}
    assert {m for m in METHODS if has_loss_weight(m, "gamma")} == {"kasa"}
    for method in METHODS:  # the adapters read the same fact
        config = AdapterConfig(method=method, beta=0.5, gamma=0.25)
        assert config.effective_beta == (0.5 if has_loss_weight(method, "beta") else 0.0)
        assert config.effective_gamma == (0.25 if has_loss_weight(method, "gamma") else 0.0)


def test_sweep_leaves_beta_and_gamma_empty_where_the_method_has_no_such_term(mixed_sweep):
    summarize_sweep(mixed_sweep)
    with (mixed_sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    by_method: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    # lora: one setting, its 8 runs pooled (its beta and gamma changed nothing), both columns empty
    assert [(r["beta"], r["gamma"], r["n"]) for r in by_method["lora"]] == [("", "", "8")]
    # kasa_l2: one row per beta, gamma empty
    assert sorted((r["beta"], r["gamma"], r["n"]) for r in by_method["kasa_l2"]) == [
        ("0.0001", "", "4"), ("0.01", "", "4")]
    # kasa: the full 2 x 2 grid
    assert len(by_method["kasa"]) == 4 and all(r["beta"] and r["gamma"] and r["n"] == "2" for r in by_method["kasa"])
    markdown = (mixed_sweep / "sweep_summary.md").read_text()
    assert "| lora | 8 |  |  | 8 |" in markdown


def test_comparison_labels_show_beta_only_for_methods_with_the_term(mixed_sweep):
    table = compare.build_table(compare.collect_runs([mixed_sweep])[0], by=["beta", "method.gamma"])
    labels = sorted(row.label for row in table.rows)
    assert labels == sorted([
        "LoRA",
        "SVD + SV adaptation + L2 beta=0.0001", "SVD + SV adaptation + L2 beta=0.01",
        "KaSA beta=0.0001, method.gamma=0.001", "KaSA beta=0.0001, method.gamma=0.1",
        "KaSA beta=0.01, method.gamma=0.001", "KaSA beta=0.01, method.gamma=0.1",
    ])


def test_parameter_count_under_the_new_and_the_old_key(tmp_path):
    write_run(tmp_path / "new" / "0", "kasa", 1e-4, 1e-3, 0, 0.6, trainable_params_without_head=295_104,
              trainable_params_with_head=888_000)
    write_run(tmp_path / "old" / "0", "lora", 1e-4, 1e-3, 0, 0.5, trainable_params=294_912)  # before the rename
    (tmp_path / "old" / "0" / "summary.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "old" / "0" / "summary.json").read_text()).items()
         if k != "trainable_params_without_head"}))
    table = compare.build_table(compare.collect_runs([tmp_path])[0])
    assert {row.method: row.params for row in table.rows} == {"kasa": 295_104, "lora": 294_912}
