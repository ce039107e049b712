"""Stop on request without losing work: SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
`--signal=USR1@<seconds>` warning before preemption).

The first signal asks the training loop to stop: it finishes the optimiser step under way, every process writes its
part of a resumable checkpoint (as in any save), one line says how to continue, and the process exits with
INTERRUPTED_EXIT. A second signal exits at once (status 128 + signal number, as a shell reports a signal death),
without a checkpoint, except in a process of a multi-process launch: its launcher (accelerate launch, torchrun)
forwards a stop signal to the processes, at times twice within milliseconds, and kills them itself when they outlast
its own timeout, so there a repeat is the same request. A signal that arrives before training has started (while the
model loads) stops at once: there is nothing to save yet.

Exit status 75 (EX_TEMPFAIL in sysexits.h, "temporary failure, retry later") tells a wrapper script or a requeueing
scheduler that the run saved its state and continues with `resume=auto`; a process killed before it could save exits
137 / 143 instead."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from kasa.config import launch_rank

INTERRUPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Set to 1 by a launcher that passes its own stop signals on to this process and stops it at once itself on a repeat
# (scripts/sweep_launch.py): here a repeat is then the same request, as in a multi-process launch (a scheduler may
# signal the job's every process and the launcher pass the same signal on).
FORWARDED_SIGNALS_ENV = "KASA_FORWARDED_SIGNALS"


class TrainingInterrupted(BaseException):
    """Raised by the loop after a stop signal, once the resumable checkpoint is written, or by the signal handler
    itself before training, when nothing could be saved yet. A BaseException, as KeyboardInterrupt is: raised from
    a handler, it lands wherever the main thread is, and libraries' `except Exception` blocks (transformers'
    lazy imports) turned it into an error of their own."""

    def __init__(self, signum: int, checkpoint: Path | None = None, step: int | None = None) -> None:
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        super().__init__(signal.Signals(signum).name)


def _say(message: str) -> None:
    """Write one line from a signal handler: os.write, since print() may be in the middle of a write already."""
    os.write(sys.stderr.fileno(), f"{message}\n".encode())


class HandlingStopSignals:
    """A `with` block (in the main thread) during which the stop signals go to the subclass's `_handle(signum,
    frame)`; the previous handlers come back after it."""

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class StopSignals(HandlingStopSignals):
    """kasa-train's stop signals (the module's docstring says what each one does).

    `checkpointable` is False until the loop can save a resumable checkpoint; until then a signal stops at once.
    `evaluating` is True during an evaluation, which a first signal lets finish (the epoch's training is saved
    before it starts)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.checkpointable = False
        self.evaluating = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        rank, processes = launch_rank()
        launched = processes > 1 or os.environ.get(FORWARDED_SIGNALS_ENV) == "1"
        if self.received is not None:
            if launched:  # the launcher's repeat (see the module's docstring)
                return
            _say(f"{name} again: stopping at once, without a checkpoint")
            os._exit(128 + signum)
        self.received = signum
        if not self.checkpointable:
            raise TrainingInterrupted(signum)
        if rank == 0:  # one line for a launch of several processes, not one each
            if self.evaluating:
                again = "" if launched else (" (send it again to stop at once: resume=auto then runs the "
                                             "evaluation again, from the checkpoint saved before it)")
                _say(f"{name}: finishing the evaluation under way, then saving a resumable checkpoint{again}")
            else:
                again = "" if launched else " (send it again to stop at once)"
                _say(f"{name}: finishing this optimiser step and saving a resumable checkpoint{again}")

    def stop_requested(self, accelerator: Any) -> bool:
        """Whether any process got a stop signal. One process: a flag read; several: a one-element all-reduce per
        call, so that every process stops at the same step and takes part in the checkpoint."""
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        import torch

        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        stop = bool(accelerator.gather(flag).max().item())
        if stop and self.received is None:
            self.received = int(signal.SIGTERM)  # another process was signalled: stop the same way
        return stop


def raised_by_a_collective(err: BaseException) -> bool:
    """Whether `err` came out of torch.distributed (a collective whose peer is gone), not from the step's own work
    (an out-of-memory error that met a stop signal stays that error)."""
    part = f"{os.sep}torch{os.sep}distributed{os.sep}"
    return any(part in frame.filename for frame in traceback.extract_tb(err.__traceback__))


def stop_outside_a_run(signum: int, frame: FrameType | None) -> None:
    """kasa-train's handler of the stop signals where no run's `StopSignals` is set up (while Hydra composes the
    config, between a sweep's jobs): the process stops at once, in one line, as it does while a run loads."""
    raise TrainingInterrupted(signum)


def ignore_stop_signals() -> None:
    """For a command that is exiting with INTERRUPTED_EXIT, its state saved: a repeated signal during the exit (the
    interpreter's teardown takes a second or more) would end it with 128 + signal, which says "not saved"."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def resume_command(argv: list[str], directory: Path, sweep: bool = False, launched: bool = False) -> str:
    """The command that continues a run: the same arguments with resume=auto and its directory pinned. For a
    --multirun sweep, `directory` is the sweep's, pinned as hydra.sweep.dir (a new time-stamped one would start the
    sweep over): its finished jobs then stay as they are, an interrupted or failed one continues, the rest start.
    A `launched` process (one of several) does not see its launcher's options, which the command must keep: the
    checkpoint resumes on as many processes."""
    args = [a for a in argv[1:] if not a.startswith(("resume=", "overwrite="))]
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    if not any(a.startswith(f"{key}=") for a in args):
        args.append(f"{key}={directory}")
    program = "accelerate launch <the same options> -m kasa.cli.train" if launched else "kasa-train"
    return f"{program} {shlex.join([*args, 'resume=auto'])}"


def interrupted_message(err: TrainingInterrupted, argv: list[str], run_dir: Path,
                        sweep_dir: Path | None = None) -> str:
    name = signal.Signals(err.signum).name
    where = ("before training started (nothing new to save)" if err.checkpoint is None
             else f"at step {err.step}: checkpoint saved in {err.checkpoint}")
    command = resume_command(argv, sweep_dir or run_dir, sweep=sweep_dir is not None, launched=launch_rank()[1] > 1)
    return f"stopped by {name} {where}; continue with: {command}"
