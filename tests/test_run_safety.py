"""Never lose or corrupt a run, across the process boundary: a stop signal saves and exits 75, and resume=auto then
ends exactly as an uninterrupted run; a second run into a held directory refuses, naming the holder; refused and
no-op runs leave a finished run's files byte for byte as they were; resuming with other settings is refused unless
allowed, and then recorded.

The signals are real (delivered to the training process by itself at a chosen optimiser step, through a driver that
wraps the recipe's `after_step`), so the tests do not race a fast tiny model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_helpers import ENV, assert_one_line_error, checkpointed_args, run_cli
from kasa.run_dir import LOCK_FILE, write_atomically
from kasa.tasks.glue import GlueTask

DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from kasa.training.loop import TrainingRecipe

    at_step = int(os.environ["AT_STEP"])
    after_step = TrainingRecipe.after_step

    def after_step_with_fault(self):
        after_step(self)
        if self.state.step != at_step:
            return
        if "SIGNAL" in os.environ:
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
        else:  # hold the run here until told to go on
            Path(os.environ["PAUSED"]).touch()
            while not Path(os.environ["GO_ON"]).exists():
                time.sleep(0.1)

    TrainingRecipe.after_step = after_step_with_fault
    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:]]
    main()
    """
)


def driven(args: list[str], at_step: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "AT_STEP": str(at_step), **env})


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "last" / "adapter_model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    expected, got = adapter(reference), adapter(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= 1e-6, key
    assert metrics(run_dir) == metrics(reference)


def files_of(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` with its bytes, but the lock file (held by whichever run is in there)."""
    return {f: f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file() and f.name != LOCK_FILE}


def record(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run's record (not its checkpoints) with its bytes and modification time."""
    files = [run_dir / name for name in ("config.json", "metrics.jsonl", "regularization.jsonl", "summary.json")]
    files += sorted((run_dir / ".hydra").iterdir())
    return {str(f.relative_to(run_dir)): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


@pytest.mark.parametrize("signal_name, at_step", [("SIGTERM", 5), ("SIGUSR1", 8)])
def test_stop_signal_saves_and_resume_ends_as_uninterrupted(uninterrupted, tiny_model, sentiment_dir, tmp_path,
                                                           signal_name, at_step):
    """Mid-epoch (step 5) and on the epoch's last step (8): exit 75, one line with the command that continues. On
    the epoch's last step the epoch's evaluation (hours, for a generation task) waits for the resume."""
    run_dir = tmp_path / "run"
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir)
    stopped = driven(args, at_step, SIGNAL=signal_name)
    _, stderr = stopped.communicate(timeout=600)
    assert stopped.returncode == 75, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal_name} at step {at_step}: checkpoint saved in "), last
    assert "; continue with: kasa-train " in last and f"hydra.run.dir={run_dir} " in last, last
    assert last.endswith(" resume=auto"), last
    assert "Traceback" not in stderr and "epoch 1: " not in stderr  # no evaluation ran
    assert (run_dir / "checkpoints" / f"step-{at_step:08d}" / "trainer_state.json").is_file()
    assert not (run_dir / "summary.json").exists()

    resumed = run_cli("kasa.cli.train", *args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{at_step:08d}'}" in resumed.stderr.replace("\n", "")
    assert_same_run(run_dir, uninterrupted)


def test_second_run_into_a_held_directory_refuses(uninterrupted, tiny_model, sentiment_dir, tmp_path):
    """The first run, held at step 2, is not disturbed: it ends exactly as the uninterrupted one."""
    run_dir = tmp_path / "run"
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir)
    first = driven(args, 2, PAUSED=str(tmp_path / "paused"), GO_ON=str(tmp_path / "go"))
    deadline = time.monotonic() + 300
    while not (tmp_path / "paused").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.2)
    second = run_cli("kasa.cli.train", *args, "resume=auto")
    assert second.returncode == 2
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run_dir} is in use by another kasa run (pid {first.pid} on "), last
    (tmp_path / "go").touch()
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert_same_run(run_dir, uninterrupted)


def test_refused_and_no_op_runs_leave_a_finished_run_as_it_was(uninterrupted, tiny_model, sentiment_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    before = record(run_dir)
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir)

    refused = run_cli("kasa.cli.train", *args, "trainer.lr=0.5")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} already holds a finished run")
    no_op = run_cli("kasa.cli.train", *args, "resume=auto")
    assert no_op.returncode == 0, no_op.stderr[-3000:]
    assert "already holds a finished run: nothing to do" in no_op.stderr
    assert record(run_dir) == before
    assert not (run_dir / "train.log").exists()
    # overwrite=true replaces the run only once the new one has got past everything that can refuse it
    checkpoints = sorted(p.relative_to(run_dir) for p in (run_dir / "checkpoints").rglob("*"))
    bad_data = [a if not a.startswith("task.data_dir=") else f"task.data_dir={tmp_path / 'missing'}" for a in args]
    refused = run_cli("kasa.cli.train", *bad_data, "overwrite=true")
    assert refused.returncode == 2 and "missing" in refused.stderr.strip().splitlines()[-1]
    assert record(run_dir) == before
    assert sorted(p.relative_to(run_dir) for p in (run_dir / "checkpoints").rglob("*")) == checkpoints



def test_overwrite_replaces_the_earlier_run_with_its_evaluations_and_figures(uninterrupted, tiny_model, sentiment_dir,
                                                                            tmp_path):
    """Nothing of the replaced run is left to be taken for the new one's: kasa-plot's figures, kasa-eval's
    outputs and the generations go with its logs and checkpoints."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    for command in (["kasa.cli.plot", str(run_dir)], ["kasa.cli.plot", str(run_dir), "--kind", "rank", "--kind",
                                                        "ablation", "--kind", "truncation"],
                    ["kasa.cli.compare", str(run_dir)]):
        done = run_cli(*command)
        assert done.returncode == 0, done.stderr[-3000:]
    written = {p.name for p in run_dir.iterdir()} - {p.name for p in uninterrupted.iterdir()}
    assert {"regularization_layer1.png", "rank.png", "rank_table.md", "ablation.json", "truncation.png",
            "comparison.md"} <= written
    for name in ("evaluations/last/validation/metrics.json", "generations/demo-validation.jsonl"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}\n")
    (run_dir / "notes.txt").write_text("the user's own file stays")

    replaced = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "trainer.lr=0.5"),
                       "overwrite=true")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    left = {p.name for p in run_dir.iterdir()} - {p.name for p in uninterrupted.iterdir()}
    assert left == {"notes.txt"}  # no figure, table or comparison of the replaced run
    assert not (run_dir / "evaluations").exists() and not (run_dir / "generations").exists()
    assert (run_dir / "notes.txt").read_text() == "the user's own file stays"
    assert json.loads((run_dir / "config.json").read_text())["trainer"]["lr"] == 0.5

def test_resume_with_changed_settings_is_refused_unless_allowed(uninterrupted, tiny_model, sentiment_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "summary.json").unlink()  # unfinished: killed after its last checkpoint
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto", "trainer.lr=0.5", "seed=3")

    refused = run_cli("kasa.cli.train", *args)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "differ from its own (seed: 0 -> 3, trainer.lr: 0.005 -> 0.5)" in last and "resume_allow_changes" in last
    allowed = run_cli("kasa.cli.train", *args, "resume_allow_changes=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resumed_with_changes"] == [{"step": 16, "changes": {"seed": [0, 3], "trainer.lr": [0.005, 0.5]}}]
    # the record is not a setting: the run still evaluates and exports (both refused its config.json before)
    evaluation = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]


def save_over(checkpoint: Path, step: int) -> None:
    """What a run still training does to checkpoints/best when it finds a better epoch: a new folder renamed in."""
    def fill(tmp: Path) -> None:
        shutil.copytree(checkpoint.parent / "last", tmp, dirs_exist_ok=True)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "score": 0.0}))

    write_atomically(checkpoint, fill, directory=True)


def test_kasa_eval_keeps_its_outputs_when_the_training_saves_over_its_checkpoint(uninterrupted, tmp_path,
                                                                                monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    best = run_dir / "checkpoints" / "best"
    step = json.loads((best / "trainer_state.json").read_text())["step"]
    evaluate = GlueTask.evaluate

    def evaluate_while_saved_over(self, *args, **kwargs):
        metrics = evaluate(self, *args, **kwargs)
        save_over(best, step + 100)
        return metrics

    monkeypatch.setattr(GlueTask, "evaluate", evaluate_while_saved_over)
    replaced = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    report = json.loads(replaced.stdout.strip().splitlines()[-1])
    folder = run_dir / "evaluations" / f"best-step-{step:08d}" / "validation"
    assert report["output_dir"] == str(folder)
    assert f"outputs for the checkpoint evaluated are in {folder}" in replaced.stderr
    assert {**json.loads((folder / "eval_validation.json").read_text()), "output_dir": str(folder)} == report
    assert not list(best.glob("eval_*.json"))  # nothing of it beside the newer save's weights

    monkeypatch.setattr(GlueTask, "evaluate", evaluate)  # a checkpoint left alone gets the outputs, as before
    kept = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert json.loads(kept.stdout.strip().splitlines()[-1])["output_dir"] == str(best)
    assert (best / "eval_validation.json").is_file() and "saved over" not in kept.stderr
    assert not (run_dir / "evaluations" / f"best-step-{step + 100:08d}").exists()  # the staged outputs moved


def test_kasa_evals_of_two_splits_at_once_keep_to_their_own_outputs(tmp_path):
    """kasa-eval split=validation ending while kasa-eval split=test still writes its outputs: the first copies and
    removes only its own staged files."""
    from kasa.cli.evaluate import evaluation_folder, place_outputs
    from kasa.run_dir import checkpoint_version

    run_dir = tmp_path / "run"
    best = run_dir / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "adapter_model.safetensors").write_bytes(b"weights")
    (best / "trainer_state.json").write_text('{"step": 8}')
    version = checkpoint_version(best)
    staged = {split: evaluation_folder(best, run_dir, 8, split) for split in ("validation", "test")}
    for split, folder in staged.items():
        (folder / "generations").mkdir(parents=True, exist_ok=True)
        (folder / "generations" / f"e2e-{split}-predictions.txt").write_text(f"{split} outputs\n")
    assert place_outputs(best, version, staged["validation"], "eval_validation.json", {"score": 1.0}) == best
    assert (best / "generations" / "e2e-validation-predictions.txt").read_text() == "validation outputs\n"
    assert not (best / "generations" / "e2e-test-predictions.txt").exists()  # still being written elsewhere
    assert (staged["test"] / "generations" / "e2e-test-predictions.txt").read_text() == "test outputs\n"
    assert not staged["validation"].exists()
    assert place_outputs(best, version, staged["test"], "eval_test.json", {"score": 0.5}) == best
    assert (best / "generations" / "e2e-test-predictions.txt").read_text() == "test outputs\n"
    assert not (run_dir / "evaluations").exists()  # nothing staged is left


def test_a_second_kasa_eval_of_the_same_split_is_refused(uninterrupted, tmp_path):
    """Two evaluations of one checkpoint's split (other decoding settings, say) would mix their outputs in one
    folder: the second stops at once, naming the first, and leaves its folder alone; when the first is done, the
    folder is gone."""
    from kasa.cli.evaluate import evaluation_folder
    from kasa.training.run_lock import RunLock

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    best = run_dir / "checkpoints" / "best"
    step = json.loads((best / "trainer_state.json").read_text())["step"]
    staged = evaluation_folder(best, run_dir, step, "validation")
    first = RunLock(staged).acquire()  # an evaluation of that split under way
    (staged / "generations").mkdir()
    second = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert_one_line_error(second, f"{staged} is in use by another kasa-eval of this checkpoint on this split "
                          f"(pid {os.getpid()} on", f"evaluate a copy of the run (cp -r {run_dir} <folder>)")
    assert sorted(p.name for p in staged.iterdir()) == [LOCK_FILE, "generations"]
    assert not (best / "eval_validation.json").exists()
    first.release()
    (staged / "generations").rmdir()
    done = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (best / "eval_validation.json").is_file() and not (run_dir / "evaluations").exists()


@pytest.mark.parametrize("command, name", [("kasa.cli.evaluate", "kasa-eval"), ("kasa.cli.export", "kasa-export")])
def test_a_checkpoint_saved_over_while_loading_is_refused(command, name, uninterrupted, tmp_path, monkeypatch):
    """Its config, weights and state could come from two saves: one error line, nothing written."""
    import kasa.adapters

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    best = run_dir / "checkpoints" / "best"
    load_adapter = kasa.adapters.load_adapter

    def load_then_saved_over(model, directory):
        load_adapter(model, directory)
        save_over(best, 10**6)
        return model

    monkeypatch.setattr(kasa.adapters, "load_adapter", load_then_saved_over)
    output = tmp_path / "exported"
    extra = [f"output={output}"] if command == "kasa.cli.export" else []
    refused = run_cli(command, f"checkpoint={run_dir}", *extra)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {best} was replaced or removed (by the training run writing it) while {name} read it: run the "
        "command again, or pass "
        "a step checkpoint that the run keeps (checkpoints/step-XXXXXXXX)")
    assert not output.exists() and not list(run_dir.rglob("eval_*.json"))


def test_kasa_eval_of_a_read_only_run_is_refused_before_loading(uninterrupted, monkeypatch):
    import os

    import kasa.adapters

    monkeypatch.setattr(kasa.adapters, "load_adapter", lambda *args: pytest.fail("loaded before the check"))
    best = uninterrupted / "checkpoints" / "best"
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != best)  # root writes anywhere: a stand-in
    refused = run_cli("kasa.cli.evaluate", f"checkpoint={uninterrupted}")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {best} is not writable, and kasa-eval writes its outputs there: evaluate a writable copy of the run "
        f"(cp -r {uninterrupted} <folder>)")


def test_kasa_eval_of_a_split_with_no_data_fails_before_the_model_loads(uninterrupted, sentiment_dir, monkeypatch):
    monkeypatch.setattr(GlueTask, "load_model", lambda self: pytest.fail("the model loaded before the split's check"))
    refused = run_cli("kasa.cli.evaluate", f"checkpoint={uninterrupted}", "split=tset")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: no file for split 'tset' in {sentiment_dir} (looked for tset.tsv, tset.csv, tset; found ")
    assert refused.stderr.strip().endswith("set task.train_split / task.eval_split (kasa-eval: split=) to one of those "
                                           "files")


def test_a_resume_on_other_training_data_is_refused_unless_allowed(uninterrupted, tiny_model, sentiment_dir, tmp_path):
    """A data file edited between the stop and the resume: the run would go on as neither run. Stood in for by
    the checkpoint's record of its data (the shared data folder stays as it is)."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "summary.json").unlink()  # unfinished: killed after its last checkpoint
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    fingerprint = state["data_fingerprint"]
    assert len(fingerprint) == 64  # every save records it
    (newest / "trainer_state.json").write_text(json.dumps({**state, "data_fingerprint": "0" * 64}))
    before = files_of(run_dir)
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto")

    refused = run_cli("kasa.cli.train", *args, "logging.trackers=[tensorboard]")  # a tracker would write a record
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: the training data differ from those {newest} was trained on (the encoded rows' fingerprint "
        f"000000000000 -> {fingerprint[:12]}: a data file, the tokenizer or an encoding setting changed): resume on "
        "the same data, or pass resume_allow_changes=true to go on with these (recorded in config.json)")
    assert files_of(run_dir) == before
    allowed = run_cli("kasa.cli.train", *args, "resume_allow_changes=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert f"(step {state['step']}, after the last step)" in allowed.stderr  # not "epoch 3" of a 2-epoch run
    assert json.loads((run_dir / "config.json").read_text())["resumed_with_changes"] == [
        {"step": state["step"], "changes": {"training data (fingerprint)": ["000000000000", fingerprint[:12]]}}]



def test_a_resume_without_its_config_is_refused_and_allowed_writes_it_again(uninterrupted, tiny_model, sentiment_dir,
                                                                            tmp_path):
    """A run whose config.json was deleted resumed with any settings, unrecorded, and finished without config.json,
    which kasa-eval and kasa-export need (walk CB)."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "summary.json").unlink()  # unfinished: killed after its last checkpoint
    (run_dir / "config.json").unlink()
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto")
    refused = run_cli("kasa.cli.train", *args, "trainer.lr=1e-2")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir / 'config.json'} is missing: cannot tell whether this resume changes settings; put it "
        "back, or pass resume_allow_changes=true to continue with these settings (written to it again)")
    allowed = run_cli("kasa.cli.train", *args, "resume_allow_changes=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["trainer"]["lr"] == json.loads((uninterrupted / "config.json").read_text())["trainer"]["lr"]


@pytest.mark.parametrize("mid_line", [False, True])
def test_a_log_cut_short_before_a_resume_is_not_padded(uninterrupted, tiny_model, sentiment_dir, tmp_path, mid_line):
    """metrics.jsonl holding less than at the checkpoint (edited, or cut by a full disk): truncating it to the
    checkpoint's offset padded it with zero bytes, which no JSON-lines reader takes; cut inside a line, the resumed
    run's first record ran on in that line (walk CB), lost to every reader."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "summary.json").unlink()  # unfinished: killed after its last checkpoint
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    half = len(lines) // 2
    metrics.write_text("".join(lines[:half]) + (lines[half][:20] if mid_line else ""))
    resumed = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: {metrics} holds less than when step-" in resumed.stderr
    assert b"\0" not in metrics.read_bytes()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[:half] == [json.loads(line) for line in lines[:half]] and records[-1]["type"] == "eval"


def test_another_runs_checkpoint_continues_only_in_a_folder_without_a_run_of_its_own(
        uninterrupted, tiny_model, sentiment_dir, tmp_path, monkeypatch):
    """resume=<another run's checkpoint>: into a folder holding an unfinished run it is refused, leaving that run as
    it was (it used to cut the folder's logs at the other run's offsets); into a fresh folder it continues the run,
    checked against that run's settings, and ends as it did, its log starting after the checkpoint's step. A run's
    own checkpoint named by a relative path is still its own."""
    checkpoint = sorted((uninterrupted / "checkpoints").glob("step-*"))[0]
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    holder = tmp_path / "holder"
    shutil.copytree(uninterrupted, holder)
    (holder / "summary.json").unlink()  # an unfinished run
    before = files_of(holder)

    refused = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, holder, f"resume={checkpoint}"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {holder} holds a run of its own, and resume={checkpoint} continues another run: pass resume=auto "
        f"to continue the run in {holder}, or choose another hydra.run.dir (hydra.sweep.dir for a --multirun sweep, "
        "--sweep-dir for scripts/sweep_launch.py) for the continued run, or overwrite=true to replace this folder's run "
        "with it")
    assert files_of(holder) == before

    fresh = tmp_path / "fresh"
    changed = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, fresh, f"resume={checkpoint}",
                                                           "trainer.lr=0.5"))
    assert changed.returncode == 2 and "with settings that differ from its own (trainer.lr: " in changed.stderr
    continued = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, fresh, f"resume={checkpoint}"))
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert all((adapter(fresh)[key] == value).all() for key, value in adapter(uninterrupted).items())
    assert metrics(fresh) == [r for r in metrics(uninterrupted) if r["step"] > step]
    assert (fresh / "config.json").is_file() and (fresh / ".hydra" / "overrides.yaml").is_file()

    monkeypatch.chdir(tmp_path)
    own = Path("holder") / "checkpoints" / checkpoint.name
    resumed = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, holder, f"resume={own}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(holder, uninterrupted)

def test_a_disk_without_room_for_the_checkpoints_refuses_the_start(tiny_model, sentiment_dir, tmp_path, monkeypatch):
    """Before any weight loads: the disk must hold the checkpoints the run keeps, or the first save would fail after
    up to an epoch of training. Nothing is left behind; where the file system does not tell its free space, the run
    starts."""
    from collections import namedtuple

    from kasa.training import preflight

    run_dir = tmp_path / "run"
    args = checkpointed_args(tiny_model, sentiment_dir, run_dir)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 10_000, 10_000))
    refused = run_cli("kasa.cli.train", *args)
    assert_one_line_error(refused, f"the disk of {run_dir} has 0.01 MiB free", "trainer.keep_checkpoints")
    assert not run_dir.exists()

    def unknown(path):
        raise OSError(95, "Operation not supported", str(path))

    monkeypatch.setattr(preflight.shutil, "disk_usage", unknown)  # a file system that does not say: no check
    started = run_cli("kasa.cli.train", *args)
    assert started.returncode == 0, started.stderr[-3000:]


def test_the_disk_check_counts_the_checkpoints_a_run_already_holds(tiny_model, tmp_path, monkeypatch):
    from collections import namedtuple

    from kasa.config import RunConfig
    from kasa.training import preflight

    cfg = RunConfig()
    cfg.model.path, cfg.trainer.max_length = str(tiny_model), 16  # the tiny model has 64 positions
    model = preflight.check_model(cfg)
    need = preflight.checkpoint_bytes(model, 2)["total"]
    held = tmp_path / "checkpoints" / "step-00000003"
    held.mkdir(parents=True)
    (held / "optimizer.pt").write_bytes(bytes(1000))
    usage = namedtuple("usage", "total used free")
    for free, refused in ((need - 1000, False), (need - 1001, True)):
        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path, free=free: usage(2**40, 0, free))
        if refused:
            with pytest.raises(ValueError, match="checkpoints take about"):
                preflight.check_disk_space(tmp_path, model, 2)
        else:
            preflight.check_disk_space(tmp_path, model, 2)


def test_the_checkpoint_estimate_holds_what_a_run_writes(uninterrupted):
    """`checkpoint_bytes` from the run's adapted meta model against the files of the finished checkpointed run
    (3 resumable checkpoints kept, best/ and last/): never less, and its tensors within a quarter of the files'."""
    from kasa.run_dir import load_run_config
    from kasa.training.preflight import CHECKPOINT_FILES_BYTES, check_model, checkpoint_bytes

    cfg = load_run_config(uninterrupted)
    estimate = checkpoint_bytes(check_model(cfg), cfg.trainer.keep_checkpoints)
    folders = sorted((uninterrupted / "checkpoints").iterdir())
    assert [f.name for f in folders][:2] == ["best", "last"] and len(folders) == 2 + cfg.trainer.keep_checkpoints
    written = sum(f.stat().st_size for f in (uninterrupted / "checkpoints").rglob("*") if f.is_file())
    assert estimate["total"] >= written
    step = folders[-1]
    tensors = sum((step / name).stat().st_size for name in ("adapter_model.safetensors", "optimizer.pt"))
    assert estimate["resumable"] - CHECKPOINT_FILES_BYTES == pytest.approx(tensors, rel=0.25)


def test_the_checkpoint_estimate_sizes_trained_weights_in_the_run_dtype(tiny_model):
    """Full fine-tuning saves every weight in the model's dtype: each of its N trained numbers takes 2 bytes less in
    bfloat16 in each copy (with 1 resumable checkpoint kept: twice the weights and twice AdamW's two moments in
    resumable checkpoints, three adapter folders: 18 N bytes in all), while kasa's adapters stay float32."""
    from kasa.config import RunConfig
    from kasa.training.preflight import check_model, checkpoint_bytes

    sizes, trained = {}, {}
    for method in ("full", "kasa"):
        for dtype in ("float32", "bfloat16"):
            cfg = RunConfig()
            cfg.model.path, cfg.model.dtype, cfg.method.method = str(tiny_model), dtype, method
            cfg.trainer.max_length = 16  # the tiny model has 64 positions
            model = check_model(cfg)
            sizes[method, dtype] = checkpoint_bytes(model, 1)["total"]
            trained[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sizes["full", "float32"] - sizes["full", "bfloat16"] == 18 * trained["full"]
    assert sizes["kasa", "bfloat16"] == sizes["kasa", "float32"]


@pytest.mark.parametrize("sweep", [False, True])
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_outside_a_run_is_one_line(tmp_path, monkeypatch, capsys, sweep, name):
    """A stop signal in the first seconds (composition) or between a sweep's jobs, where no run's stop signals are
    set up: Ctrl-C printed Python's KeyboardInterrupt traceback, and SIGTERM killed the process without a word, its
    empty run folder left behind (walk AL); a sweep's line says how to continue it."""
    import signal
    import time

    from kasa.cli import train
    from kasa.training.signals import STOP_SIGNALS

    def signalled() -> None:
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(5)  # the handler interrupts it

    monkeypatch.setattr(train, "_hydra_main", signalled)
    monkeypatch.setattr(train, "SWEEP_DIR", [tmp_path / "sweep"] if sweep else [])
    monkeypatch.setattr(sys, "argv", ["kasa-train", *(["--multirun"] if sweep else []), "method.beta=0,1e-4"])
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}  # main() sets its own
    try:
        with pytest.raises(SystemExit) as stop:
            train.main()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        logging.disable(logging.NOTSET)  # set for the exit of a run stopped before training
    lines = capsys.readouterr().err.strip().splitlines()
    if sweep:
        assert stop.value.code == 75 and lines == [
            f"stopped by {name} between the sweep's jobs; continue with: kasa-train --multirun method.beta=0,1e-4 "
            f"recipe=demo hydra.sweep.dir={tmp_path / 'sweep'} resume=auto"]
    else:
        assert stop.value.code == 128 + getattr(signal, name) and lines == [
            f"stopped by {name} before training started: nothing was trained or saved"]


@pytest.mark.parametrize("resumed", [False, True])
def test_a_signal_while_the_model_loads_says_whether_anything_is_saved(uninterrupted, tiny_model, sentiment_dir,
                                                                       tmp_path, monkeypatch, resumed):
    """SIGTERM while a fresh run loaded exited 75 ("saved, resume me") with a continue command, and its folder gone
    (walk AA): a requeue wrapper would requeue a job its user cancelled. A run with checkpoints to resume keeps 75."""
    import signal

    from kasa.training import loop

    run_dir = tmp_path / "run"
    if resumed:  # an interrupted run: its checkpoints, no summary
        shutil.copytree(uninterrupted, run_dir)
        (run_dir / "summary.json").unlink()
    load = loop.TrainingRecipe.setup_model

    def signalled_while_loading(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        load(self)

    monkeypatch.setattr(loop.TrainingRecipe, "setup_model", signalled_while_loading)
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto"))
    line = result.stderr.strip().splitlines()[-1]
    if resumed:
        assert result.returncode == 75 and "before training started (nothing new to save); continue with:" in line
    else:
        assert (result.returncode, line) == (143, "stopped by SIGTERM before training started: nothing was trained "
                                                  "or saved")
        assert not run_dir.exists()


def test_a_signal_inside_a_library_that_catches_exception_still_stops(tiny_model, sentiment_dir, tmp_path,
                                                                     monkeypatch):
    """SIGTERM or Ctrl-C landing in transformers' lazy import of the model class (~3.7 s into a run): its `except
    Exception` turned kasa's stop into "Could not import module 'BertForSequenceClassification'", a 139-line
    traceback and exit 1 (walk AL). The stop is a BaseException now, as KeyboardInterrupt is."""
    import signal
    import time

    from kasa.training import loop

    load = loop.TrainingRecipe.setup_model

    def signalled_inside_a_library(self) -> None:
        try:  # what transformers' _LazyModule.__getattr__ does around an import
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts it
        except Exception as err:
            raise ModuleNotFoundError("Could not import module 'BertForSequenceClassification'") from err
        load(self)

    monkeypatch.setattr(loop.TrainingRecipe, "setup_model", signalled_inside_a_library)
    run_dir = tmp_path / "run"
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir))
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        143, "stopped by SIGTERM before training started: nothing was trained or saved")
    assert not run_dir.exists()


@pytest.mark.parametrize("resumed", [False, True])
def test_a_signal_that_cuts_torchs_import_short_stops_in_one_line(uninterrupted, tiny_model, sentiment_dir, tmp_path,
                                                                  monkeypatch, resumed):
    """Ctrl-C about 1.5 s into kasa-train lands in torch's first import (the config check's): the stop's handling then
    imported kasa's checkpoint code, which imports torch again, and a torch whose import was cut short cannot be
    imported again in that process ("Only a single TORCH_LIBRARY can be used to register the namespace prims"): a
    123-line traceback and exit 1. Here the config check is stopped, and importing torch's side of kasa fails after."""
    import signal
    import time

    from kasa.training import preflight

    run_dir = tmp_path / "run"
    if resumed:  # an interrupted run: its checkpoints, no summary
        shutil.copytree(uninterrupted, run_dir)
        (run_dir / "summary.json").unlink()

    def stopped_in_torchs_import(cfg) -> None:
        for module in [name for name in sys.modules if name == "torch" or name.startswith("kasa.training.")]:
            monkeypatch.setitem(sys.modules, module, None)  # import torch, or what imports it: ImportError
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler interrupts it

    monkeypatch.setattr(preflight, "check_config_values", stopped_in_torchs_import)
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto"))
    monkeypatch.undo()
    lines = result.stderr.strip().splitlines()
    if resumed:
        assert result.returncode == 75 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith("stopped by SIGINT before training started (nothing new to save); continue with:")
    else:
        assert (result.returncode, lines) == (130, ["stopped by SIGINT before training started: nothing was trained "
                                                    "or saved"]), result.stderr[-3000:]
        assert not run_dir.exists()


@pytest.mark.parametrize("sweep", [False, True])
def test_a_signal_after_the_run_finished_changes_nothing(uninterrupted, tiny_model, sentiment_dir, tmp_path,
                                                         monkeypatch, sweep):
    """A stop signal after the summary was written (the interpreter's teardown takes a second or more) exited 143,
    which says "killed before it could save", for a finished run (walk AL) and after a finished sweep (walk AN)."""
    import signal
    import time

    from kasa.cli import train

    hydra_main = train._hydra_main

    def signalled_after_the_run() -> None:
        hydra_main()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)

    monkeypatch.setattr(train, "_hydra_main", signalled_after_the_run)
    if sweep:  # a sweep of one job, finished already
        shutil.copytree(uninterrupted, tmp_path / "sweep" / "0")
        args = ["--multirun", *checkpointed_args(tiny_model, sentiment_dir, tmp_path / "unused", "resume=auto"),
                f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
        args = checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto")
    result = run_cli("kasa.cli.train", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already holds a finished run" in result.stdout + result.stderr


def test_a_resume_stopped_while_its_config_is_checked_exits_75(uninterrupted, tiny_model, sentiment_dir, tmp_path,
                                                               monkeypatch):
    """The config's check imports torch (seconds): a stop there reached no run's handler and said "nothing was
    trained or saved" with 143 for a run that has checkpoints to resume (walk AN); a requeue keyed on 75 dropped it."""
    import signal
    import time

    from kasa.training import preflight

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "summary.json").unlink()  # an interrupted run: its checkpoints, no summary
    check = preflight.check_config_values

    def signalled_while_checking(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts it
        return check(*args, **kwargs)

    monkeypatch.setattr(preflight, "check_config_values", signalled_while_checking)
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir, "resume=auto"))
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 75 and "before training started (nothing new to save); continue with:" in line, line
