"""Never lose or corrupt a run, the parts that need no training: the run-directory lock, the stop-signal handler,
the checks made before any model loads, and the refusal of non-finite checkpoints."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kasa.adapters.io import refuse_non_finite, save_tensors
from kasa.config import RunConfig
from kasa.run_dir import LOCK_FILE
from kasa.training import preflight
from kasa.training.run_lock import RunDirLocked, RunLock
from kasa.training.signals import (
    StopSignals,
    TrainingInterrupted,
    interrupted_message,
    raised_by_a_collective,
    resume_command,
)


def _standalone(module: str) -> str:
    """Python that imports a stdlib-only kasa module by its path, without kasa's (slow: torch) package import."""
    path = Path(__file__).parents[1] / "kasa" / "training" / f"{module}.py"
    return (f"import importlib.util, sys\nspec = importlib.util.spec_from_file_location({module!r}, {str(path)!r})\n"
            f"{module} = importlib.util.module_from_spec(spec)\nspec.loader.exec_module({module})\n")


@pytest.mark.parametrize("error, free, code", [
    # safetensors, which removes its partial file before it raises: the disk no longer looks full
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 2**30, errno.ENOSPC),
    (Exception("Error while serializing: I/O error: Disk quota exceeded (os error 122)"), 2**30, errno.EDQUOT),
    # torch.save says nothing of the cause; its partial file fills the disk
    (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), 1024, errno.ENOSPC),
    # other failed writes (walk AA: `ulimit -f`, a traceback and exit 1)
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), 2**30, errno.EIO),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1206144 vs 1206032"), 2**30, errno.EIO),
    (Exception("Error while serializing: I/O error: File too large (os error 27)"), 2**30, errno.EFBIG),
    (RuntimeError("not a write error"), 1024, None),
])
def test_a_failed_write_in_a_library_error_is_one_line(tmp_path, monkeypatch, error, free, code):
    """A disk that filled during a checkpoint save, with 1 MiB left once safetensors had removed its partial file,
    gave safetensors' traceback and exit 1, not the README's line; so did a file size limit."""
    from kasa.cli.common import describe_error
    from kasa.run_dir import write_atomically

    usage = shutil.disk_usage(tmp_path)._replace(free=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage)

    def fill(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise error

    target = tmp_path / "adapter_model.safetensors"
    with pytest.raises(OSError if code else type(error)) as raised:
        write_atomically(target, fill)
    assert list(tmp_path.iterdir()) == []  # no partial file left either way
    if code:
        assert raised.value.errno == code and raised.value.filename == str(target)
        cause = {errno.EIO: "the write failed (torch.save does not say why: a full quota, a file size limit?)",
                 errno.EFBIG: "File too large (a file size limit: ulimit -f)"}
        expected = (f"cannot write {target}: {cause[code]}; fix the cause" if code in cause
                    else f"no space left on the device of {target}: free space")
        assert describe_error(raised.value) == (f"{expected}, then continue with resume=auto (every complete "
                                                "checkpoint is kept)")



def test_a_file_system_error_is_advised_in_the_command_s_own_terms():
    """kasa-compare and kasa-plot on a read-only folder advised hydra.run.dir=..., kasa-train's option (walk CB);
    a full disk under kasa-eval advised resume=auto."""
    import errno

    from kasa.cli.common import describe_error

    read_only = OSError(errno.EROFS, "Read-only file system", "runs/x/comparison.md")
    assert describe_error(read_only) == ("Read-only file system: runs/x/comparison.md: check its permissions, or "
                                         "choose another folder (e.g. hydra.run.dir=...)")
    assert describe_error(read_only, output_option="--out <folder>") == (
        "Read-only file system: runs/x/comparison.md: check its permissions, or choose another folder (e.g. --out "
        "<folder>)")
    full = OSError(errno.ENOSPC, "No space left on device", "runs/x/evaluations/best/result.json")
    assert describe_error(full, output_option="") == ("no space left on the device of "
                                                      "runs/x/evaluations/best/result.json: free space, then run the "
                                                      "command again")

def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunDirLocked, match=rf"in use by another kasa run \(pid {os.getpid()} on .*: wait for it to "
                                           r"end, or choose another hydra.run.dir \(hydra.sweep.dir for a --multirun "
                                           r"sweep, --sweep-dir for scripts/sweep_launch.py\)$"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_lock_dies_with_its_process(tmp_path):
    """A holder killed with SIGKILL leaves nothing stuck: the kernel drops the flock with the process."""
    ready, signal_ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: take the lock, say so, wait to be killed
        try:
            RunLock(tmp_path / "run").acquire()
            os.write(signal_ready, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    assert os.read(ready, 1) == b"x"
    with pytest.raises(RunDirLocked, match=f"pid {pid}"):
        RunLock(tmp_path / "run").acquire()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    RunLock(tmp_path / "run").acquire().release()


def test_a_refused_start_discards_its_empty_run_directory(tmp_path):
    """release(discard_empty=True) removes the lock file and the folder when nothing else is in it, while the lock
    is held; a folder holding anything else keeps all of it."""
    RunLock(tmp_path / "run").acquire().release(discard_empty=True)
    assert not (tmp_path / "run").exists()
    lock = RunLock(tmp_path / "run").acquire()
    (tmp_path / "run" / "config.json").write_text("{}")
    lock.release(discard_empty=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE, "config.json"]


def test_lock_taken_on_a_discarded_file_is_taken_again(tmp_path, monkeypatch):
    """A process that opened the lock file just before a refused start discarded it locks a file no longer in the
    folder: it notices and locks the one at the path, so two runs never hold the same folder."""
    real_flock, discarded = fcntl.flock, []

    def flock_after_a_discard(fd, operation):
        if not discarded and operation & fcntl.LOCK_EX:  # the other process discards between our open and flock
            discarded.append(os.fstat(fd).st_ino)
            (tmp_path / "run" / LOCK_FILE).unlink()
            (tmp_path / "run").rmdir()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_discard)
    lock = RunLock(tmp_path / "run").acquire()
    assert discarded and os.stat(tmp_path / "run" / LOCK_FILE).st_ino == os.fstat(lock._fd).st_ino
    with pytest.raises(RunDirLocked):
        RunLock(tmp_path / "run").acquire()
    lock.release()


def test_first_signal_requests_a_stop_second_exits_at_once(tmp_path):
    script = _standalone("signals") + textwrap.dedent("""
        import os, signal, time
        with signals.StopSignals() as stop:
            stop.checkpointable = True
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == signal.SIGTERM, stop.received
            print('requested', flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print('not reached')
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "requested"
    assert result.returncode == 128 + signal.SIGINT
    assert "SIGINT again: stopping at once" in result.stderr


def test_a_signal_during_an_evaluation_says_that_the_evaluation_finishes_first():
    """It said "finishing this optimiser step", then ran an hour of generation: a user would send it again."""
    script = _standalone("signals") + textwrap.dedent("""
        import os, signal
        with signals.StopSignals() as stop:
            stop.checkpointable = stop.evaluating = True
            os.kill(os.getpid(), signal.SIGUSR1)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("SIGUSR1: finishing the evaluation under way, then saving a resumable checkpoint "
                                     "(send it again to stop at once: resume=auto then runs the evaluation again, "
                                     "from the checkpoint saved before it)")


def test_only_a_collective_s_error_counts_as_a_stopped_peer():
    """Under a launch, a RuntimeError that meets a stop signal is the stop only when torch.distributed raised it (a peer
    that stopped at once left the collective); the step's own error, an out-of-memory one say, stays itself."""
    import torch.distributed

    def own_work():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError) as own:
        own_work()
    assert not raised_by_a_collective(own.value)
    with pytest.raises((RuntimeError, ValueError)) as collective:  # no process group: torch.distributed's own error
        torch.distributed.all_reduce(torch.zeros(1))
    assert raised_by_a_collective(collective.value)


def test_under_a_launcher_that_passes_signals_on_a_repeat_is_the_same_request():
    """scripts/sweep_launch.py passes its signal on to the job, which a scheduler may also have signalled: a repeat
    must not stop the job without its checkpoint (the launcher does that itself on a second signal)."""
    script = _standalone("signals") + textwrap.dedent("""
        import os, signal
        with signals.StopSignals() as stop:
            stop.checkpointable = True
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            print('still here', stop.received == signal.SIGTERM, flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "KASA_FORWARDED_SIGNALS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "still here True", result.stderr
    assert result.stderr.strip() == "SIGTERM: finishing this optimiser step and saving a resumable checkpoint"


def test_in_a_launch_of_several_processes_a_repeated_signal_is_the_same_request():
    """accelerate launch's agent forwards a SIGTERM to its processes twice within milliseconds: that must not turn
    into "stop at once, without a checkpoint" (the launcher kills the processes itself after its own timeout)."""
    script = _standalone("signals") + textwrap.dedent("""
        import os, signal
        with signals.StopSignals() as stop:
            stop.checkpointable = True
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == signal.SIGTERM, stop.received
        print('saving', flush=True)
    """)
    for rank, said in (("0", "SIGTERM: finishing this optimiser step and saving a resumable checkpoint\n"), ("1", "")):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "saving\n", said)  # rank 0 alone says it


def test_a_stopped_command_exits_saved_whatever_signal_comes_next():
    """kasa-train, its checkpoint saved, exits with 75; a second SIGTERM during the interpreter's teardown ended it
    with 143 ("killed before it could save")."""
    script = _standalone("signals") + textwrap.dedent("""
        import os, signal, sys
        signals.ignore_stop_signals()
        for signum in signals.STOP_SIGNALS:
            os.kill(os.getpid(), signum)
        sys.exit(signals.INTERRUPTED_EXIT)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 75, result.stderr[-2000:]


def test_signal_before_training_stops_at_once():
    with StopSignals() as stop:
        with pytest.raises(TrainingInterrupted):
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):  # the handler runs between bytecodes of the main thread
                pass
    assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the old handler is back



def test_ctrl_c_in_kasa_eval_export_or_estimate_is_one_line(tmp_path):
    """Ctrl-C in kasa-eval, kasa-export, kasa-estimate (any command but kasa-train, which saves first) printed
    Python's KeyboardInterrupt traceback, 25-46 lines; a write it cut short leaves nothing (write_atomically)."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from kasa.cli.common import run_reporting_errors
        from kasa.run_dir import write_atomically

        def interrupted(tmp):
            tmp.write_text("half")
            raise KeyboardInterrupt

        run_reporting_errors(lambda: write_atomically(Path({str(tmp_path / "out.json")!r}), interrupted))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "stopped by SIGINT (Ctrl-C)\n")
    assert list(tmp_path.iterdir()) == []

def test_resume_command_pins_the_run_or_sweep_dir_and_adds_resume_auto(monkeypatch):
    argv = ["kasa-train", "recipe=glue/roberta_base_cola", "trainer.lr=1e-3", "overwrite=true"]
    assert resume_command(argv, Path("/runs/a b")) == (
        "kasa-train recipe=glue/roberta_base_cola trainer.lr=1e-3 'hydra.run.dir=/runs/a b' resume=auto")
    sweep = ["kasa-train", "--multirun", "method.beta=1e-4,1e-3", "resume=auto"]
    assert resume_command(sweep, Path("/sweeps/s"), sweep=True) == (
        "kasa-train --multirun method.beta=1e-4,1e-3 hydra.sweep.dir=/sweeps/s resume=auto")
    err = TrainingInterrupted(signal.SIGTERM, Path("/runs/x/checkpoints/step-00000007"), 7)
    line = interrupted_message(err, ["kasa-train", "hydra.run.dir=/runs/x", "resume=auto"], Path("/runs/x"))
    assert line == ("stopped by SIGTERM at step 7: checkpoint saved in /runs/x/checkpoints/step-00000007; "
                    "continue with: kasa-train hydra.run.dir=/runs/x resume=auto")
    # one of several processes: the launcher's options are not in its arguments
    launched = ["/site-packages/kasa/cli/train.py", "trainer.batch_size=4", "hydra.run.dir=/runs/x"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert interrupted_message(err, launched, Path("/runs/x")).endswith(
        "continue with: accelerate launch <the same options> -m kasa.cli.train trainer.batch_size=4 "
        "hydra.run.dir=/runs/x resume=auto")


def _config(**trainer) -> RunConfig:
    cfg = RunConfig()
    cfg.trainer = replace(cfg.trainer, **trainer)
    return cfg


@pytest.mark.parametrize("setting, value", [
    ("epochs", 0), ("grad_accum", 0), ("batch_size", 0), ("eval_batch_size", -1), ("lr", -1.0), ("lr", 0.0),
    ("lr", math.nan), ("head_lr", 0.0), ("warmup_ratio", 1.5), ("max_steps", 0), ("save_every", 0),
    ("keep_checkpoints", 0), ("log_every", 0), ("label_smoothing", 1.0), ("precision", "fp8"), ("scheduler", "nope"),
])
def test_bad_values_are_named(setting, value):
    with pytest.raises(ValueError, match=rf"trainer\.{setting}="):
        preflight.check_config_values(_config(**{setting: value}))


def test_good_values_pass():
    preflight.check_config_values(_config(head_lr=None, max_steps=5, save_every=1, max_grad_norm=1.0))


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_the_model_own_weights_do_not_train_in_float16(method):
    """AdamW's moments in float16 underflow (adapters and heads train in float32 instead; these train the model's own
    weights): refused at start, bfloat16 and float32 models allowed."""
    cfg = _config()
    cfg.method.method, cfg.model.dtype = method, "float16"
    with pytest.raises(ValueError, match=f"method={method} trains the model's own float16 weights.*model.dtype="):
        preflight.check_config_values(cfg, on_this_machine=False)
    # kasa-eval and kasa-export read such runs (trained before the refusal, walk AJ), or evaluate one in float16
    preflight.check_config_values(cfg, decomposes=False, on_this_machine=False, trains=False)
    for dtype in ("bfloat16", "float32"):
        cfg.model.dtype = dtype
        preflight.check_config_values(cfg, on_this_machine=False)
    cfg.method.method, cfg.model.dtype = "kasa", "float16"
    preflight.check_config_values(cfg, on_this_machine=False)


@pytest.mark.parametrize("dtype, precision", [("float16", "bf16"), ("bfloat16", "fp16")])
def test_two_half_precision_types_are_refused(dtype, precision):
    """float16 weights under bf16 autocast ended in a traceback from LayerNorm on the CPU (walk AJ)."""
    cfg = _config(precision=precision)
    cfg.model.dtype = dtype
    with pytest.raises(ValueError, match=f"model.dtype={dtype} with trainer.precision={precision} mixes two"):
        preflight.check_config_values(cfg, on_this_machine=False)
    cfg.model.dtype = "float32"
    preflight.check_config_values(cfg, on_this_machine=False)


def test_train_on_inputs_is_for_the_generation_tasks():
    cfg = _config()
    cfg.task.train_on_inputs = True
    with pytest.raises(ValueError, match="task.train_on_inputs=true applies to the generation tasks"):
        preflight.check_config_values(cfg, on_this_machine=False)
    cfg.task.kind = "instruction"
    preflight.check_config_values(cfg, on_this_machine=False)


def test_a_gpu_for_the_decompositions_is_checked_only_where_they_run():
    """kasa-eval repeats no decomposition: a run that decomposed on a GPU evaluates on a machine without one."""
    cfg = _config()
    cfg.method.svd_device = "cuda:7"
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match="method.svd_device=cuda:7: this machine has"):
        preflight.check_config_values(cfg)
    preflight.check_config_values(cfg, decomposes=False)


def test_output_dir_that_is_a_file_or_unwritable(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        preflight.check_output_dir(afile / "run")
    with pytest.raises(OSError, match="cannot write into hydra.run.dir=/proc/kasa-run"):
        preflight.check_output_dir(Path("/proc/kasa-run"))
    preflight.check_output_dir(tmp_path / "fine" / "run")
    assert list((tmp_path / "fine" / "run").iterdir()) == []  # the probe file is gone


def test_a_folder_that_takes_no_new_file_is_refused_not_retried_forever():
    """/proc exists but no file can be made in it: the lock's retry (for a folder a refused start removed in between)
    looped forever at full CPU."""
    with pytest.raises(ValueError, match=r"^cannot create /proc/\.kasa\.lock: /proc takes no new files; choose "):
        RunLock("/proc").acquire()


def test_resume_checkpoint_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        preflight.check_resume_checkpoint(tmp_path / "nowhere")
    ckpt = tmp_path / "step-00000003"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="incomplete"):
        preflight.check_resume_checkpoint(ckpt)
    torch.save({}, ckpt / "scheduler.pt")
    save_file({"torch": torch.zeros(2)}, str(ckpt / "rng.safetensors"))
    with pytest.raises(ValueError, match=r"incomplete \(adapter_model.safetensors missing\)"):
        preflight.check_resume_checkpoint(ckpt)
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"incomplete \(optimizer.pt missing\)"):
        preflight.check_resume_checkpoint(ckpt)
    torch.save({}, ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        preflight.check_resume_checkpoint(ckpt)
    save_file({"layer.adapters.sigma": torch.tensor([1.0, math.inf])}, str(ckpt / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="tensor layer.adapters.sigma holds NaN or inf"):
        preflight.check_resume_checkpoint(ckpt)
    save_file({"layer.adapters.sigma": torch.ones(2)}, str(ckpt / "adapter_model.safetensors"))
    preflight.check_resume_checkpoint(ckpt)
    # a hand-edited state: its fields would be copied into the resumed run's records (summary.json's
    # truncation_loss) unchecked (walk AR)
    for state, reason in [({"step": "3"}, 'field step is "3", not a whole number'),
                          ({"truncation_loss": {"base": 1.0, "truncated": "high"}}, "field truncation_loss is"),
                          ({"truncation_loss": {"base": 1.0}}, "truncation_loss has keys ['base'], not base and"),
                          ([], "holds list, not the training state's fields")]:
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=re.escape(reason)):
            preflight.check_resume_checkpoint(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "best": 0.5, "truncation_loss": None}))
    preflight.check_resume_checkpoint(ckpt)


def test_non_finite_refused_with_the_tensor_name():
    refuse_non_finite({"a": torch.ones(3), "steps": torch.tensor([1, 2])}, "x")
    with pytest.raises(ValueError, match="tensor b holds NaN"):
        refuse_non_finite({"a": torch.ones(3), "b": torch.tensor([0.0, math.nan])}, "x")


def test_weight_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_tensors({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640


def _llama_run(folder: Path, **shape) -> RunConfig:
    """An instruction run on a Llama of this shape whose folder holds its config.json and no weights."""
    from transformers import LlamaConfig

    LlamaConfig(**shape).save_pretrained(folder)
    cfg = RunConfig()
    cfg.model = replace(cfg.model, path=str(folder))
    cfg.task = replace(cfg.task, kind="instruction")
    return cfg


def test_large_model_without_gpu_needs_the_override(tmp_path, monkeypatch):
    cfg = _llama_run(tmp_path / "big", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=32000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"6\.\d\dB parameters and no GPU.*trainer.allow_cpu=true"):
        preflight.check_model(cfg)
    cfg.trainer = replace(cfg.trainer, allow_cpu=True)
    cfg.method = replace(cfg.method, target_modules=["q_proj", "v_proj"], trainable_modules=[])
    preflight.check_model(cfg)


def test_targets_and_ranks_are_checked_on_the_architecture_before_any_weight_loads(tmp_path):
    """The folder holds config.json and no weights: what fails is the method against the layers, from the
    architecture alone (it would otherwise fail after the download and the load)."""
    cfg = _llama_run(tmp_path / "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=100)
    cfg.method = replace(cfg.method, target_modules=["q_prj"], trainable_modules=[])
    with pytest.raises(ValueError, match=r"no module matches 'q_prj' of target_modules \['q_prj'\]; linear layers "
                                         r"in this model: \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj'"):
        preflight.check_model(cfg)
    cfg.method = replace(cfg.method, target_modules=["k_proj"], rank=64)
    with pytest.raises(ValueError, match=r"rank 64 .* must be < min\(n, m\) = 64 for 'model.layers.0.self_attn.k_proj"):
        preflight.check_model(cfg)
    cfg.method = replace(cfg.method, rank=8, trainable_modules=["score"])
    with pytest.raises(ValueError, match="no module matches 'score' of trainable_modules \['score'\]"):
        preflight.check_model(cfg)
    cfg.method = replace(cfg.method, trainable_modules=[])
    preflight.check_model(cfg)


@pytest.mark.parametrize("value", [2, 0.001, None, True, "q_proj", "hello world", "it's", ["a", "b c"], "null",
                                   "1e-3", "/tmp/x-y/z.json", "a,b", "", [1, 2.5]])
def test_a_refused_resume_names_the_runs_own_settings_as_overrides_that_set_them(value) -> None:
    """The refusal said "drop those overrides" also where the change came from an override left off (walk AU: a
    run trained with trainer.grad_accum=2, resumed without it): it now gives the run's own values as overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(preflight.as_override("trainer.x", value))
    assert override.key_or_group == "trainer.x" and override.value() == value


def test_a_refused_resume_suggests_the_model_s_settings_not_the_method_s_copies(tmp_path):
    """method.target_modules (a copy of model.target_modules) was suggested too, and kasa-train refuses it as
    following the model (walk AX)."""
    saved = {"model": {"target_modules": ["query"]}, "method": {"target_modules": ["query"], "rank": 4}}
    now = {"model": {"target_modules": ["query", "value"]}, "method": {"target_modules": ["query", "value"],
                                                                       "rank": 8}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"resume with its own \(method\.rank=4 'model\.target_modules=\[\"query\"\]'\), or"):
        preflight.check_resume_config(tmp_path / "config.json", now, allow_changes=False)


def test_resume_config_differences(tmp_path):
    saved = {"trainer": {"lr": 0.001, "epochs": 2, "save_every": 3}, "resume": None, "hydra_overrides": ["a=1"],
             "logging": {"progress": True}}
    now = {"trainer": {"lr": 0.5, "epochs": 2, "save_every": 5}, "resume": "auto", "hydra_overrides": ["b=2"],
           "logging": {"progress": False}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"trainer\.lr: 0\.001 -> 0\.5\): resume with its own \(trainer\.lr=0\.001\), or pass resume_allow_changes"):
        preflight.check_resume_config(tmp_path / "config.json", now, allow_changes=False)
    assert preflight.check_resume_config(tmp_path / "config.json", now, allow_changes=True) == {
        "trainer.lr": (0.001, 0.5)}
    assert preflight.check_resume_config(tmp_path / "config.json", saved | {"resume": "auto"}, False) == {}


def test_where_the_judge_is_asked_is_no_difference():
    """A resume that only points at another judge endpoint (the one that failed the evaluation) needed
    resume_allow_changes=true, and kasa-compare told runs apart by the judge's retries (walk AP); the judge's model is
    a difference."""
    saved = dataclasses.asdict(RunConfig())
    now = dataclasses.asdict(RunConfig())
    now["task"]["judge"] |= {"base_url": "http://other:8000/v1", "api_key_env": "OTHER_KEY", "max_retries": 9,
                             "timeout": 5.0, "concurrency": 1}
    assert preflight.config_differences(saved, now) == {}
    now["task"]["judge"]["model"] = "another-judge"
    assert set(preflight.config_differences(saved, now)) == {"task.judge.model"}


def test_settings_the_method_does_not_use_are_no_difference():
    """A lora run resumed or rerun without its method.beta=0.1 (which kasa-train said changed nothing) was refused as
    one with other settings (walk AI); under kasa, which uses beta, it is one; and so is the method itself."""
    saved = dataclasses.asdict(RunConfig())
    saved["method"] |= {"method": "lora", "beta": 0.1, "calibration_samples": 64}
    saved["trainer"]["lr"] = 0.5
    now = dataclasses.asdict(RunConfig())
    now["method"]["method"] = "lora"
    assert preflight.config_differences(saved, now) == {"trainer.lr": (0.5, now["trainer"]["lr"])}
    for config in (saved, now):
        config["method"]["method"] = "kasa"
    # the weight basis uses no calibration setting
    assert set(preflight.config_differences(saved, now)) == {"method.beta", "trainer.lr"}
    now["method"]["method"] = "lora"
    assert {"method.method", "method.beta"} <= set(preflight.config_differences(saved, now))


def test_a_saved_run_overrides_read_as_kasa_train_reads_them(tmp_path):
    """kasa-eval and kasa-export parsed overrides as YAML, where `no` is the boolean False: `trainer.precision=no`,
    the one way to evaluate a bf16 run in float32, was refused as `trainer.precision=False` (walk AK)."""
    from kasa.run_dir import load_run_config

    saved = dataclasses.asdict(RunConfig())
    saved["trainer"]["precision"], saved["model"]["name"], saved["task"]["name"] = "bf16", "tiny", "sst2"
    saved["output_dir"] = str(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = load_run_config(tmp_path, ["trainer.precision=no", "task.eval_sets=[boolq,piqa]",
                                     "task.max_eval_samples=null", "trainer.lr=1e-3"])
    assert (cfg.trainer.precision, cfg.task.eval_sets, cfg.task.max_eval_samples) == ("no", ["boolq", "piqa"], None)
    assert cfg.trainer.lr == 1e-3
    with pytest.raises(ValueError, match="trainer.lr=1,2: a saved run's settings can be set here, one value each"):
        load_run_config(tmp_path, ["trainer.lr=1,2"])


def test_compare_and_sweep_skip_and_name_runs_without_a_finite_result(tmp_path, caplog):
    """A summary with best -Infinity (written by older versions for a run that never evaluated) is no result."""
    import logging

    from kasa.analysis import compare, sweep

    for job, best in (("0", 0.7), ("1", -math.inf), ("2", 0.8)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        summary = {"task": "cola", "method": "kasa", "metric": "matthews", "best": best, "seed": int(job),
                   "rank": 8, "beta": 1e-4, "gamma": 1e-3, "trainable_params": 10, "overrides": []}
        (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING):
        runs, skipped = sweep.load_runs(tmp_path)
        table = compare.build_table(compare.collect_runs([tmp_path])[0])
    assert [r.path.name for r in runs] == ["0", "2"] and [p.name for p in skipped] == ["1"]
    assert sorted(table.rows[0].cells[("cola", "matthews")].values) == [0.7, 0.8]
    named = [r.getMessage() for r in caplog.records if "has no best score" in r.getMessage()]
    assert len(named) == 2 and all(str(tmp_path / "1") in m for m in named)


def test_binary_data_file_names_the_file(tmp_path):
    from kasa.config import TaskConfig
    from kasa.data.errors import DataError
    from kasa.data.glue import load_glue_splits

    (tmp_path / "train.tsv").write_bytes(bytes(range(128, 256)) * 4)  # e.g. a gzip saved under the .tsv name
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nthe movie was good\t1\n")
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.tsv'} is not a UTF-8 text file"):
        load_glue_splits(TaskConfig(name="demo", data_dir=str(tmp_path)))
