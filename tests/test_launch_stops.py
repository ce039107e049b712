"""A two-process launch (DDP over gloo, `accelerate launch` as a user runs it) that stops early: a signal as
training starts, a rank that fails alone or is killed, processes started with other settings. Each ends in one
line, not a traceback per rank, and leaves nothing half-made. Each test runs a small driver that patches kasa-train
in every rank to meet its situation."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_helpers import ENV, make_tiny_bert, write_sentiment_data

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for the launch: a hung collective fails the test instead of hanging it


def launch_two_ranks(tmp_path: Path, driver: str, **env: str) -> tuple[int, str, Path]:
    """(the launcher's exit status, everything it and its ranks printed, the run directory) of `driver` (a script
    that ends by calling kasa-train's main) launched on 2 processes, KaSA on a tiny BERT, one epoch."""
    make_tiny_bert(tmp_path / "model")
    write_sentiment_data(tmp_path / "data")
    script, log, run = tmp_path / "driver.py", tmp_path / "run.log", tmp_path / "run"
    script.write_text(textwrap.dedent(driver))
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(REPO / "configs" / "accelerate" / "multi_gpu.json"),
              "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0", str(script),
              f"model.path={tmp_path / 'model'}", f"task.data_dir={tmp_path / 'data'}", "trainer.epochs=1",
              "trainer.batch_size=4", "trainer.max_length=16", "logging.progress=false", "method.svd_cache_dir=null",
              "method.rank=4", f"hydra.run.dir={run}"]
    # a session of its own, so that a timeout kills the launcher and every rank it started
    process = subprocess.Popen(launch, env={**ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **env},
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"timed out after {TIMEOUT} s:\n{log.read_text()[-3000:]}")
    return process.returncode, log.read_text(), run


def assert_no_rank_traceback(text: str) -> None:
    # (the launcher's own ChildFailedError report, a traceback of accelerate's, follows any failed rank)
    assert not re.search(r"^\[rank\d\]:", text, re.MULTILINE), text[-3000:]


SIGNAL_AT_THE_START = """
    import os, signal, sys
    from kasa.training.loop import TrainingRecipe

    train_epochs = TrainingRecipe.train_epochs

    def signalled_as_training_starts(self):
        # As a launcher's SIGTERM that reaches rank 0 just before it can save and rank 1 just after: rank 0 stops
        # at once, rank 1 goes on to the step's first collective, to save a checkpoint with its peer.
        if self.accelerator.process_index == 0:
            self.stop.checkpointable = False
        os.kill(os.getpid(), signal.SIGTERM)
        return train_epochs(self)

    TrainingRecipe.train_epochs = signalled_as_training_starts
    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:]]
    main()
"""


def test_a_signal_as_training_starts_stops_every_rank_in_one_line(tmp_path):
    """A stop signal that one process of a launch gets before it can save and another just after: the first stops at
    once, and the other's collective then fails for want of its peer. That failure is the same stop (exit 143, rank
    0's one line), where rank 1 printed gloo's "Connection closed by peer" traceback of ~80 lines."""
    status, text, run = launch_two_ranks(tmp_path, SIGNAL_AT_THE_START)
    assert status != 0
    assert text.count("stopped by SIGTERM before training started: nothing was trained or saved") == 1, text[-3000:]
    assert "Connection closed by peer" not in text and "[rank1]: Traceback" not in text, text[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


ONE_RANK_FAILS = """
    import os, sys
    from kasa.training.loop import TrainingRecipe

    train_epochs = TrainingRecipe.train_epochs

    def rank_0_fails(self):
        # As a disk that fills under rank 0 alone: rank 1 goes on to its next collective, which fails.
        if self.accelerator.process_index == 0:
            raise OSError(28, "No space left on device (a stand-in)")
        return train_epochs(self)

    TrainingRecipe.train_epochs = rank_0_fails
    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:]]
    main()
"""


def test_a_rank_that_fails_alone_leaves_one_line_not_the_others_gloo_traceback(tmp_path):
    """A full disk under rank 0 during training: its one error line, then rank 1's failed barrier printed gloo's
    "Connection closed by peer" traceback of ~70 lines (walk AU; a rank killed with SIGKILL left the other's ~60).
    The survivor's failed collective is a line of its own (kasa.training.loop's `collective_failed`), printed after
    the pause that lets the launcher stop it first, as other ranks' errors are (kasa.cli.common.fail)."""
    status, text, _ = launch_two_ranks(tmp_path, ONE_RANK_FAILS)
    assert status != 0
    assert_no_rank_traceback(text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors and "No space left on device (a stand-in)" in errors[0], text[-3000:]


def test_the_settings_of_a_launch_s_processes_must_agree_but_node_local_ones():
    """Two nodes started with other overrides (walk AU: batch 8 on one, 4 on the other) trained until a collective
    of mismatched sizes aborted one rank with gloo's "Received data size doesn't match", leaving a run folder."""
    from kasa.training.preflight import check_same_settings

    config = {"trainer": {"batch_size": 8, "lr": 0.1, "save_every": 10}, "model": {"path": "/a"},
              "task": {"data_dir": "/d"}, "hydra_overrides": ["trainer.batch_size=8"]}
    local = {**config, "model": {"path": "/node1/copy"}, "task": {"data_dir": "/node1/d"}, "hydra_overrides": []}
    check_same_settings([config, local, config])
    other = {**config, "trainer": {"batch_size": 4, "lr": 0.1, "save_every": 20}}
    with pytest.raises(ValueError, match=r"^the launch's processes were started with different settings "
                                         r"\(trainer\.batch_size: 8 on rank 0, 4 on rank 2, trainer\.save_every: 10 "
                                         r"on rank 0, 20 on rank 2\): start every process with the same") as err:
        check_same_settings([config, config, other])
    assert err.value.every_rank_alike  # rank 0 alone reports it


OTHER_OVERRIDES = """
    import os, sys
    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:], *(["trainer.batch_size=2"] if os.environ["RANK"] == "1" else [])]
    main()
"""


def test_a_launch_whose_processes_hold_other_settings_is_refused_in_one_line(tmp_path):
    status, text, run = launch_two_ranks(tmp_path, OTHER_OVERRIDES)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert status != 0 and len(errors) == 1, text[-3000:]
    assert "trainer.batch_size: 4 on rank 0, 2 on rank 1" in errors[0] and not run.exists(), text[-3000:]
