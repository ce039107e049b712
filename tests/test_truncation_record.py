"""The start-of-training record of a truncating method: summary.json's truncation_loss {base, truncated} equals the
held-out losses measured directly, and one warning line appears when the truncation raises the loss by more than
5% (relative)."""

from __future__ import annotations

import json

import pytest

from kasa.adapters import apply_adapters
from kasa.cli.common import compose_run
from kasa.tasks import build_task
from kasa.training import loop
from kasa.training.calibration import START_CHECK_EXAMPLES, batches_of, calibration_rows, damage_warning, mean_loss


def run_config(model, data, out, *extra: str):
    return compose_run([f"model.path={model}", f"task.data_dir={data}", "trainer.epochs=1", "trainer.batch_size=8",
                        "trainer.max_length=16", "trainer.max_steps=1", "logging.progress=false",
                        "method.svd_cache_dir=null", "method.rank=12", *extra], str(out))


def test_summary_records_the_held_out_losses(tiny_model, sentiment_dir, tmp_path):
    cfg = run_config(tiny_model, sentiment_dir, tmp_path / "run")
    summary = loop.train(cfg, {"hydra_overrides": []})
    record = json.loads((tmp_path / "run" / "summary.json").read_text())["truncation_loss"]
    assert record == summary["truncation_loss"] and set(record) == {"base", "truncated"}
    task = build_task(cfg)
    tokenizer, model = task.load_model()
    dataset = task.train_dataset(tokenizer)
    held = batches_of(dataset, calibration_rows(dataset, cfg, START_CHECK_EXAMPLES)[1], task.collator(tokenizer), cfg)
    assert sum(len(b["labels"]) for b in held) == min(START_CHECK_EXAMPLES, 32)  # the demo set has 32 rows
    assert record["base"] == pytest.approx(mean_loss(task.loss, model, held), abs=1e-6)
    apply_adapters(model, cfg.method)
    assert record["truncated"] == pytest.approx(mean_loss(task.loss, model, held), abs=1e-6)
    assert record["truncated"] != record["base"]


@pytest.mark.parametrize("losses, warned", [((2.0, 2.09), False), ((2.0, 2.2), True)])
def test_warning_line_above_the_threshold(tiny_model, sentiment_dir, tmp_path, monkeypatch, capsys, losses, warned):
    """The loop prints damage_warning's line for the losses it measured (here set to straddle the threshold)."""
    measured = iter(losses)
    monkeypatch.setattr(loop, "mean_loss", lambda *args: next(measured))
    summary = loop.train(run_config(tiny_model, sentiment_dir, tmp_path / "run"), {"hydra_overrides": []})
    assert summary["truncation_loss"] == {"base": losses[0], "truncated": losses[1]}
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: the truncation")]
    assert len(lines) == int(warned)
    if warned:
        assert "2.0000 to 2.2000 (+10%)" in lines[0] and "kasa-inspect" in lines[0]


def test_damage_warning_threshold():
    assert damage_warning(3.0, 3.15, ["v_proj"]) is None  # exactly 5%
    assert damage_warning(3.0, 2.0, ["v_proj"]) is None  # a lower loss is no damage
    assert "from 3.0000 to 8.0000" in damage_warning(3.0, 8.0, ["q_proj", "v_proj"])
    assert damage_warning(3.0, 8.0, ["v_proj"]).endswith("or set method.truncation_basis=activation")
    # the activation basis in use already: the advice was to set it
    assert damage_warning(3.0, 8.0, ["v_proj"], "activation").endswith(
        "or remove fewer components (method.truncation_rank, which defaults to method.rank), or leave those modules out "
        "of model.target_modules")


def test_no_record_for_methods_without_truncation(tiny_model, sentiment_dir, tmp_path):
    cfg = run_config(tiny_model, sentiment_dir, tmp_path / "run", "method=lora")
    assert loop.train(cfg, {"hydra_overrides": []})["truncation_loss"] is None


def test_calibration_batches_group_similar_lengths():
    """The calibration examples are the permutation's first ones, batched shortest first (little padding); the
    held-out ones keep the permutation's order."""
    from types import SimpleNamespace

    import torch

    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    dataset = [{"input_ids": [1] * n} for n in lengths]
    cfg = SimpleNamespace(method=SimpleNamespace(calibration_samples=6, truncation_basis="activation"),
                          task=SimpleNamespace(train_split="train"), trainer=SimpleNamespace(batch_size=2))
    calibration, held = (batches_of(dataset, rows, lambda batch: [len(r["input_ids"]) for r in batch], cfg)
                         for rows in calibration_rows(dataset, cfg, held_out=4))
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    assert [n for batch in calibration for n in batch] == sorted(lengths[i] for i in order[:6])
    assert [n for batch in held for n in batch] == [lengths[i] for i in order[6:]]
