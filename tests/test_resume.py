"""Never lose work: a run killed with SIGKILL (mid-epoch, or in the middle of writing a checkpoint) and continued
with resume=auto ends exactly as an uninterrupted run; finished runs are not overwritten; a NaN loss stops cleanly.

The kill is real (SIGKILL from inside the training process) and lands at a chosen point: a driver script wraps the
checkpoint writer, so the test does not race a fast tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import ENV, assert_one_line_error, checkpointed_args, run_cli

KILLING_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import kasa.training.checkpoint as checkpoint
    import kasa.training.loop as loop

    after = int(os.environ["KILL_AFTER"])
    calls = 0

    def count_and_maybe_die():
        global calls
        calls += 1
        if calls == after:
            os.kill(os.getpid(), signal.SIGKILL)

    if os.environ["KILL_WHERE"] == "after_save":
        save = loop.save_training_state
        def killing_save(*args, **kwargs):
            result = save(*args, **kwargs)
            count_and_maybe_die()
            return result
        loop.save_training_state = killing_save
    else:  # halfway through writing a checkpoint: the adapter file is written, the rest is not
        save_adapter = checkpoint.save_adapter
        def killing_save_adapter(*args, **kwargs):
            result = save_adapter(*args, **kwargs)
            count_and_maybe_die()
            return result
        checkpoint.save_adapter = killing_save_adapter

    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:]]
    main()
    """
)

FAILING_EVALUATION_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from kasa.tasks.glue import GlueTask

    def unreachable(*args, **kwargs):
        if os.environ.get("EVALUATION_KILLED") == "1":  # a preemption's SIGKILL in the middle of a long evaluation
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("the evaluation failed (a stand-in for an unreachable judge or beam search out of memory)")

    GlueTask.evaluate = unreachable
    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:]]
    main()
    """
)


def killed_run(args: list[str], where: str, after: int) -> subprocess.CompletedProcess:
    env = {**ENV, "KILL_WHERE": where, "KILL_AFTER": str(after)}
    return subprocess.run([sys.executable, "-c", KILLING_DRIVER, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "last" / "adapter_model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("where, after", [("after_save", 2), ("during_save", 3)])
def test_killed_and_resumed_run_equals_uninterrupted(uninterrupted, tiny_model, sentiment_dir, tmp_path, where,
                                                     after):
    run_dir = tmp_path / "run"
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir)
    killed = killed_run(args, where, after)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()
    if where == "during_save":  # the half-written checkpoint is left aside as a temporary directory
        assert any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())

    refused = run_cli("kasa.cli.train", *args)  # an unfinished run is not silently restarted
    assert refused.returncode == 2 and "resume=auto" in refused.stderr

    resumed = run_cli("kasa.cli.train", *args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    expected, got = adapter(uninterrupted), adapter(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= 1e-6, key
    assert metrics(run_dir) == metrics(uninterrupted)


def test_a_resume_rebuilds_the_truncated_base_without_calibrating_or_decomposing(tiny_model, sentiment_dir,
                                                                                  tmp_path, monkeypatch):
    """A resumed run truncates its base by the triplets its checkpoint removed: it had calibrated and decomposed
    every weight again (minutes for a 7B model in the activation basis, at every preemption). It ends bit for bit
    like the uninterrupted run and reports the truncation measured at its start. A resume that changes the model or
    the method (resume_allow_changes=true: another base, another calibration) decomposes again, for those."""
    import kasa.adapters.model as adapter_model

    extra = ("method.truncation_basis=activation", "method.calibration_samples=8", "method.svd_cache_dir=null")
    full, run_dir, changed = tmp_path / "full", tmp_path / "run", tmp_path / "changed"
    finished = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, full, *extra))
    assert finished.returncode == 0, finished.stderr[-3000:]
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir, *extra)
    assert killed_run(args, "after_save", 2).returncode == -9
    shutil.copytree(run_dir, changed)

    calls = []
    decompose, gather = adapter_model.singular_components, adapter_model.moment_groups
    monkeypatch.setattr(adapter_model, "singular_components", lambda *a, **k: calls.append(1) or decompose(*a, **k))
    monkeypatch.setattr(adapter_model, "moment_groups", lambda *a, **k: calls.append(1) or gather(*a, **k))
    resumed = run_cli("kasa.cli.train", *args, "resume=auto")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert not calls
    expected, got = adapter(full), adapter(run_dir)
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert metrics(run_dir) == metrics(full)
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (full, run_dir)]
    assert summaries[0]["truncation_loss"] == summaries[1]["truncation_loss"] is not None

    resumed = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, changed, *extra), "resume=auto",
                      "method.calibration_samples=4", "resume_allow_changes=true")
    assert resumed.returncode == 0 and calls, resumed.stderr[-3000:]


def test_a_resume_over_model_files_replaced_at_the_same_path_is_refused(tiny_model, sentiment_dir, tmp_path):
    """The truncated base is rebuilt from the checkpoint's triplets: over another model's weights at the same path
    (no setting changed) they would be subtracted from the wrong weights; refused in one line."""
    import transformers

    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    shutil.copytree(tiny_model, model_dir)
    args = checkpointed_args(model_dir, sentiment_dir, run_dir)
    assert killed_run(args, "after_save", 2).returncode == -9
    other = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    other.save_pretrained(model_dir)
    saved = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    resumed = run_cli("kasa.cli.train", *args, "resume=auto")
    assert resumed.returncode == 2 and resumed.stderr.strip().splitlines()[-1].startswith(
        "error: this adapter does not fit this model: the singular components it removed from"), resumed.stderr
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == saved  # nothing lost


def test_a_killed_run_on_an_nf4_base_resumes_bit_for_bit(tiny_model, sentiment_dir, tmp_path):
    """The quantized base is rebuilt on resume from the float model and the checkpoint's removed components, then
    quantized again: the run must end with the very adapter of an uninterrupted nf4 run."""
    pytest.importorskip("bitsandbytes")
    full, run_dir = tmp_path / "full", tmp_path / "run"
    finished = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, full, "model.quantization=nf4"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir, "model.quantization=nf4")
    assert killed_run(args, "after_save", 2).returncode == -9
    resumed = run_cli("kasa.cli.train", *args, "resume=auto")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    expected, got = adapter(full), adapter(run_dir)
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert metrics(run_dir) == metrics(full)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (kasa[peft])")
@pytest.mark.parametrize("kept", [True, False])
def test_a_killed_adalora_run_resumes_bit_for_bit(tiny_model, sentiment_dir, tmp_path, kept):
    """AdaLoRA's rank allocator keeps importance averages and, from its final phase on (step 10 of 16 here), the rank
    pattern it masks with: a run killed after a final-phase checkpoint must resume to the very adapter of an
    uninterrupted run (it crashed inside PEFT, with no rank pattern, before the checkpoint kept them). A checkpoint
    written before kasa kept them (kept=False) resumes too, its pattern taken from the step's gradients (walk AN)."""
    options = ["method=adalora", "method.rank=2", "+method.peft_options.init_r=4", "method.peft_options.tinit=2",
               "method.peft_options.tfinal=6"]
    full, run_dir = tmp_path / "full", tmp_path / "run"
    finished = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, full, *options))
    assert finished.returncode == 0, finished.stderr[-3000:]
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir, *options)
    assert killed_run(args, "after_save", 7).returncode == -9
    newest = max((run_dir / "checkpoints").glob("step-*"))  # what resume=auto continues from
    assert int(newest.name.split("-")[1]) > 10  # in the final phase
    if not kept:
        (newest / "adalora_allocator.pt").unlink()
    resumed = run_cli("kasa.cli.train", *args, "resume=auto")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    if not kept:  # the same masks: the masked values were zero, with the lowest scores
        masks = [{k: t == 0 for k, t in adapter(run).items() if ".lora_E." in k} for run in (full, run_dir)]
        assert masks[0].keys() == masks[1].keys() and all(masks[0][k].equal(masks[1][k]) for k in masks[0])
        return
    expected, got = adapter(full), adapter(run_dir)
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert metrics(run_dir) == metrics(full)


@pytest.mark.parametrize("failure", ["raises", "killed"])
def test_a_failed_or_killed_evaluation_keeps_the_training_and_resume_evaluates_it(uninterrupted, tiny_model,
                                                                                   sentiment_dir, tmp_path, failure):
    """The first epoch's evaluation raises, or the process is killed with SIGKILL while it runs (a generation task's
    evaluation can take hours): the epoch's training was saved before the evaluation began, with the evaluation due,
    and resume=auto evaluates the epoch and goes on, ending as the uninterrupted run."""
    run_dir = tmp_path / "run"
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir)
    failed = subprocess.run([sys.executable, "-c", FAILING_EVALUATION_DRIVER, *args], capture_output=True, text=True,
                            env={**ENV, "EVALUATION_KILLED": str(int(failure == "killed"))}, timeout=600)
    if failure == "killed":
        assert failed.returncode == -9, failed.stderr[-2000:]
    else:
        assert failed.returncode == 1 and "the evaluation failed (a stand-in" in failed.stderr
        assert "the evaluation of epoch 1 failed; what was trained is kept in" in failed.stderr
    state = json.loads((run_dir / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["pending_evaluation"] == 0 and state["epoch"] == 1 and state["history"] == []

    resumed = run_cli("kasa.cli.train", *args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 8, the evaluation of epoch 1 first)" in resumed.stderr  # not "epoch 2": that evaluation comes first
    expected, got = adapter(uninterrupted), adapter(run_dir)
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert metrics(run_dir) == metrics(uninterrupted)
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):  # the evaluation is done: no longer due anywhere
        assert "pending_evaluation" not in json.loads((checkpoint / "trainer_state.json").read_text())


def test_finished_run_is_not_overwritten(uninterrupted, tiny_model, sentiment_dir):
    summary = uninterrupted / "summary.json"
    before = summary.read_bytes(), summary.stat().st_mtime_ns
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, uninterrupted))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "overwrite=true" in lines[-1]
    assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(tiny_model, sentiment_dir, tmp_path):
    run_dir = tmp_path / "nan"
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "method=full",
                                                          "trainer.lr=1e30", "trainer.save_every=1"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss became") and "at step" in last
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved, "the checkpoints written before the NaN are kept"


def test_weights_broken_under_a_finite_loss_are_never_evaluated_or_saved(tiny_model, sentiment_dir, tmp_path):
    """A last step whose loss was finite can still leave NaN or inf in the weights (here an overflowing update): the
    run stops before the evaluation and the saves that would have written them as best/, last/ and a step."""
    run_dir = tmp_path / "broken"
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "trainer.lr=1e39",
                                                          "trainer.max_steps=1"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the trained weights hold nan or inf after step 1, whose loss was finite: lower trainer.lr or set "
        "trainer.max_grad_norm; the checkpoints written so far are kept")
    assert not (run_dir / "summary.json").exists() and not list(run_dir.glob("checkpoints/*"))


def _checkpoint_of(tmp_path: Path, **state) -> Path:
    from kasa.run_dir import STATE_FILE
    from kasa.training.checkpoint import TrainState

    directory = tmp_path / "step-00000006"
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_text(json.dumps(TrainState(**state).to_json()))
    return directory


def test_a_resume_on_another_batch_layout_continues_only_on_the_same_examples(tmp_path):
    """Mid-epoch (2 micro-batches of 2 processes x 4 done): another layout continues where its steps take the same 8
    examples (the 2-process case runs in tests/test_distributed.py) and counts the epoch's micro-batches in its own."""
    from kasa.training.checkpoint import DEEPSPEED_DIR, TrainState, check_batch_layout

    saved = dict(step=6, batches_in_epoch=2, processes=2, batch_size=4, grad_accum=1)
    checkpoint = _checkpoint_of(tmp_path, **saved)
    for layout in ((2, 4, 1), (1, 8, 1), (1, 4, 2), (4, 2, 1), (1, 2, 4)):
        check_batch_layout(checkpoint, *layout)
        state = TrainState(**saved)
        state.continue_with(*layout)
        assert state.batches_in_epoch * layout[0] * layout[1] == 16 and state.processes == layout[0]
    with pytest.raises(ValueError, match="this launch has 1 process.* would take 4: resume on 2 process.*"
                                         r"\(trainer.batch_size=8 with resume_allow_changes=true\)"):
        check_batch_layout(checkpoint, 1, 4, 1)
    with pytest.raises(ValueError, match="stopped 16 examples into an epoch.*steps of 12 examples cannot continue"):
        check_batch_layout(checkpoint, 2, 6, 1)  # the same processes, a larger batch (resume_allow_changes=true)
    with pytest.raises(ValueError, match="stopped 16 examples into an epoch"):  # grouped by length, the batch
        check_batch_layout(checkpoint, 1, 8, 1, grouped_by_length=True)  # size orders the data
    check_batch_layout(checkpoint, 1, 4, 2, grouped_by_length=True)
    check_batch_layout(_checkpoint_of(tmp_path / "old", step=6, batches_in_epoch=2), 1, 4, 1)  # no layout recorded
    (checkpoint / DEEPSPEED_DIR).mkdir()  # ZeRO's partitions, one per process
    with pytest.raises(ValueError, match="one partition per process, for 2 process.*: resume it on 2 process"):
        check_batch_layout(checkpoint, 1, 8, 1)
    check_batch_layout(checkpoint, 2, 4, 1)


def test_the_metrics_log_says_where_it_ends_past_a_line_cut_short(tmp_path):
    """What the trackers had when a run was killed: the last whole record of metrics.jsonl (an eval record follows
    its step's train record)."""
    from kasa.training.checkpoint import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.last_position() == (0, 0)
    log.write({"type": "train", "step": 3, "loss": 1.0})
    assert log.last_position() == (3, 0)
    log.write({"type": "eval", "step": 3, "accuracy": 0.5})
    with log.path.open("a") as f:
        f.write('{"type": "train", "st')  # killed mid-write
    assert log.last_position() == (3, 1)
    assert MetricsLog(tmp_path / "metrics.jsonl", enabled=False).last_position() == (0, 0)


def test_a_checkpoint_of_another_engine_is_refused_before_the_model_loads(uninterrupted, tiny_model, sentiment_dir,
                                                                           tmp_path):
    """A DeepSpeed checkpoint resumed without DeepSpeed was refused only after the model had loaded."""
    import shutil

    from cli_helpers import assert_one_line_error

    checkpoint = tmp_path / "step"
    shutil.copytree(sorted((uninterrupted / "checkpoints").glob("step-*"))[0], checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "deepspeed").mkdir()  # what a DeepSpeed run saves in its place
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, tmp_path / "run",
                                                          f"resume={checkpoint}"))
    assert_one_line_error(result, "has no optimizer.pt: it was written with DeepSpeed; resume it under the same engine")


def test_a_checkpoint_of_other_shapes_is_refused_in_one_line(uninterrupted, tiny_model, sentiment_dir, tmp_path):
    """resume=<another run's checkpoint> with another method.rank (or task.num_labels) under resume_allow_changes:
    one line naming the tensor and both shapes (it was a RuntimeError from copy_ after the model loaded)."""
    checkpoint = sorted((uninterrupted / "checkpoints").glob("step-*"))[0]
    run_dir = tmp_path / "other_rank"
    rank = json.loads((uninterrupted / "config.json").read_text())["method"]["rank"]
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, f"resume={checkpoint}",
                                                          "resume_allow_changes=true", f"method.rank={rank + 2}"))
    assert_one_line_error(result, f"checkpoint {checkpoint} does not match this run: its tensor ", "has shape",
                          "resume with the settings that wrote it", after_the_model_loaded=True)


@pytest.mark.parametrize("best_state, line", [
    ({"epoch": 0, "step": 8}, "best so far: epoch 1 of {source}, its best/ copied into this run"),
    ({"epoch": 1, "step": 16}, "warning: the best epoch so far, 1, was trained in {source}, whose best/ no longer "
                               "holds it: this run's best/ holds only what it evaluates itself"),
])
def test_another_runs_checkpoint_brings_its_best_along(uninterrupted, tiny_model, sentiment_dir, tmp_path,
                                                       best_state, line):
    """resume=<another run's step checkpoint> after that run's first evaluation: summary.json names the best epoch
    so far, whose weights were in the other run only (kasa-eval which=best then fell back to last/ unsaid)."""
    source = tmp_path / "source"
    shutil.copytree(uninterrupted, source)
    checkpoint = source / "checkpoints" / "step-00000012"  # epoch 2: epoch 1 was evaluated, its best recorded
    assert json.loads((checkpoint / "trainer_state.json").read_text())["best_epoch"] == 0
    best_record = source / "checkpoints" / "best" / "trainer_state.json"
    best_record.write_text(json.dumps(json.loads(best_record.read_text()) | best_state))
    run_dir = tmp_path / "continued"
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, f"resume={checkpoint}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert line.format(source=source.resolve()) in (result.stdout + result.stderr).splitlines()
    summary = json.loads((run_dir / "summary.json").read_text())
    best = json.loads((run_dir / "checkpoints" / "best" / "trainer_state.json").read_text()) \
        if (run_dir / "checkpoints" / "best").is_dir() else None
    if best_state["epoch"] == 0:  # best/ holds the epoch summary.json names, copied or this run's own
        assert best is not None and best["epoch"] + 1 == summary["best_epoch"]


def test_which_best_asked_for_is_never_last(tmp_path):
    """Without `which`, a run without best/ (trainer.save_best=false) gives last/; which=best asked for is refused
    there instead of giving last/ unsaid."""
    from kasa.run_dir import ADAPTER_WEIGHTS_FILE, find_checkpoint

    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    (last / ADAPTER_WEIGHTS_FILE).write_bytes(b"")
    assert find_checkpoint(tmp_path) == (last, tmp_path)
    assert find_checkpoint(tmp_path, "last") == (last, tmp_path)
    with pytest.raises(FileNotFoundError, match="has no best/ checkpoint .*: pass which=last$"):
        find_checkpoint(tmp_path, "best")


@pytest.mark.parametrize("saved_files, stage, refused", [
    (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 3, True),
    (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 2, True),
    (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 3, False),
    (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 1, False),
])
def test_a_deepspeed_checkpoint_of_the_other_zero_stage_is_refused_before_it_loads(tmp_path, saved_files, stage,
                                                                                    refused):
    """ZeRO-2 resumed under ZeRO-3 (or back) met a bare AssertionError from DeepSpeed on every rank (walk Z)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from kasa.training.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, check_same_engine

    for name in saved_files:
        (tmp_path / DEEPSPEED_DIR / DEEPSPEED_TAG).mkdir(parents=True, exist_ok=True)
        (tmp_path / DEEPSPEED_DIR / DEEPSPEED_TAG / name).write_bytes(b"")
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    if refused:
        with pytest.raises(ValueError, match=f"this launch runs stage {stage}: resume it with the launch's DeepSpeed"):
            check_same_engine(tmp_path, accelerator)
    else:
        assert check_same_engine(tmp_path, accelerator) == tmp_path / DEEPSPEED_DIR


def test_a_checkpoint_that_a_kill_left_moved_aside_is_the_one_resumed(uninterrupted, tiny_model, sentiment_dir,
                                                                      tmp_path):
    """A kill between write_atomically's two renames leaves the newest checkpoint as .step-N.<pid>.old: resume=auto
    chose an older one (or, with none, started over) before the .old was put back (walk AA)."""
    run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    (run_dir / "summary.json").unlink()
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    os.replace(newest, newest.with_name(f".{newest.name}.999.old"))
    resumed = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {newest}" in resumed.stderr
    assert metrics(run_dir) == metrics(uninterrupted)


@pytest.mark.parametrize("damaged", ["rng.safetensors", "optimizer.pt", "scheduler.pt"])
def test_a_damaged_optimizer_schedule_or_rng_file_is_skipped_by_resume_auto(uninterrupted, tiny_model, sentiment_dir,
                                                                           tmp_path, damaged):
    """Only the state and adapter files were read before the model loaded: a truncated rng.safetensors ended in a
    traceback (exit 1), a truncated optimizer.pt in 'written by another setup', and the intact older checkpoint was
    never tried (walk AA: what a partial copy of a run folder leaves)."""
    run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    (run_dir / "summary.json").unlink()
    older, newest = sorted((run_dir / "checkpoints").glob("step-*"))[-2:]
    with open(newest / damaged, "r+b") as file:
        file.truncate(50)
    resumed = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping {newest.name}: cannot read checkpoint {newest}" in resumed.stderr
    assert f"resumed from {older}" in resumed.stderr
    assert metrics(run_dir) == metrics(uninterrupted)


def test_a_resume_with_changed_optimiser_settings_trains_with_them(tmp_path, tiny_model, sentiment_dir):
    """resume_allow_changes=true recorded a new trainer.lr, weight_decay or max_steps and trained on with the
    checkpoint's: its learning rates, weight decay and schedule length came back with the optimiser's moments
    (walk AW: steps 5-8 at the old schedule's 2e-4 ... 5e-5, a max_steps resume's first step at lr 0). The changed
    settings now apply from the resumed step: the steps after it train as a fresh run of the new settings would."""
    changed = ["trainer.lr=1e-2", "trainer.weight_decay=0.5", "trainer.max_steps=11"]
    first = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, tmp_path / "a", "trainer.lr=4e-4",
                                                        "trainer.keep_checkpoints=10"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, tmp_path / "b", *changed),
                      f"resume={tmp_path / 'a' / 'checkpoints' / 'step-00000003'}", "resume_allow_changes=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fresh = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, tmp_path / "c", *changed))
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def rates(run: str) -> dict[int, float]:
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in records if r["type"] == "train"}

    after = {step: lr for step, lr in rates("c").items() if step > 3}
    assert len(after) == 8 and {step: rates("b")[step] for step in after} == after
    latest = max((tmp_path / "b" / "checkpoints").glob("step-*"))
    groups = torch.load(latest / "optimizer.pt", weights_only=True)["param_groups"]
    assert {group["weight_decay"] for group in groups} == {0.5}


def test_a_resume_at_or_past_the_end_of_a_shortened_schedule(tmp_path, tiny_model, sentiment_dir):
    """trainer.max_steps lowered to the checkpoint's step (mid-epoch): the run ended without evaluating ("ended
    without an evaluation: no summary written", its folder left with config.json); lowered below it: the same
    (walk AX). At the step, the epoch ends there and is evaluated, as in a fresh run; below it, one line before
    anything is written."""
    args = checkpointed_args(tiny_model, sentiment_dir, tmp_path / "a", "trainer.keep_checkpoints=10")
    assert run_cli("kasa.cli.train", *args).returncode == 0
    checkpoints = tmp_path / "a" / "checkpoints"
    at_end = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, tmp_path / "b",
                                                          "trainer.max_steps=3"),
                     f"resume={checkpoints / 'step-00000003'}", "resume_allow_changes=true")
    assert at_end.returncode == 0, at_end.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and len(summary["eval_history"]) == 1
    past = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, tmp_path / "c",
                                                        "trainer.max_steps=4"),
                   f"resume={checkpoints / 'step-00000006'}", "resume_allow_changes=true")
    # from trainer_state.json before the model loads (walk CB: it was said after loading and decomposing)
    assert_one_line_error(past, "has trained 6 steps, more than the 4 of this run's schedule")
    assert not (tmp_path / "c" / "config.json").exists()
