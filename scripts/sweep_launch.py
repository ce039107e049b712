"""python scripts/sweep_launch.py [options] recipe=... method.beta=1e-4,1e-3 method.gamma=1e-4,1e-3 seed=0,1,2

A sweep of multi-process (multi-GPU, DeepSpeed, FSDP) training jobs: one `accelerate launch ... -m kasa.cli.train`
per combination of the comma-separated values, one after the other, then the sweep summary.

Why not `kasa-train --multirun` under `accelerate launch`: Hydra's multirun runs its jobs inside every process that
accelerate starts, so each rank would run its own sweep loop (with its own job numbering and time-stamped sweep
directory) and the ranks of one job would no longer be the same processes for every job. The sweep has to sit
outside the launcher: this script is that outer loop.

    python scripts/sweep_launch.py --sweep-dir runs/sweeps/cola-beta \\
        --launcher "accelerate launch --config_file configs/accelerate/multi_gpu.json -m kasa.cli.train" \\
        recipe=glue/roberta_base_cola method.beta=1e-4,1e-3 method.gamma=1e-4,1e-3 seed=0,1,2

Every `key=v1,v2,...` argument is a sweep axis (commas inside [...], {...}, (...) or quotes do not split, so
`model.target_modules=[query,value]` is one value); `key=value` is passed to every job. A recipe's own sweep (its
`hydra.sweeper.params`, which `kasa-train --multirun` runs: the ablation/ and sweeps/ recipes) gives the first axes,
and a key given here replaces its values, in its place. The grid is the product of the axes in that order, the last
one varying fastest (the order of Hydra's multirun), and job i runs with
`hydra.run.dir=<sweep dir>/<i>`. Written into the sweep directory: sweep_jobs.json (each job's overrides, command,
exit status and seconds, updated as jobs finish) and, from kasa.analysis.sweep.summarize_sweep, sweep_summary.md,
sweep_summary.csv and the beta x gamma heatmap.

Before anything is written: the launcher's program must be on PATH, the sweep directory must not be a run's own
folder, and every job's config is checked (a bad value in the last combination stops the sweep at once, exit status
2), and so is its folder, as kasa-train checks it. Every job runs with resume=auto (unless resume= or overwrite= is
given), so a job whose folder holds its own finished run (the same resolved settings) is skipped, and a sweep run
again with the same --sweep-dir continues where it stopped: an interrupted or failed job from its last checkpoint,
the jobs not yet started from scratch. A job whose folder holds a finished run with other settings (another grid in
the same --sweep-dir) is refused before any job runs, one `error:` line per such job: overwrite=true replaces those
runs. A failed job is reported and the sweep goes on (--stop-on-error to stop); the exit status is 1 if any job
failed.

A stop signal (SIGTERM, SIGINT, SIGUSR1) to this script is passed on to the job under way, which saves a resumable
checkpoint and exits, as kasa-train does; the sweep then stops, writes its summary of the finished jobs, prints the
command that continues it (this one again) and exits with status 75. A second signal stops the job at once, without
its checkpoint. Jobs run in a session of their own, so a terminal's Ctrl-C reaches them only through this script;
on Linux a job gets SIGTERM when this script dies, even of SIGKILL, so that it saves and stops rather than run on.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Callable

from kasa.cli.parser import ArgumentParser
from kasa.run_dir import SWEEP_JOBS_FILE, time_stamp, write_json
from kasa.training.signals import FORWARDED_SIGNALS_ENV, INTERRUPTED_EXIT, HandlingStopSignals

DEFAULT_LAUNCHER = "accelerate launch -m kasa.cli.train"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
RESERVED = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.mode")


def split_values(value: str) -> list[str]:
    """Split `value` at the commas outside brackets and quotes: `1e-4,1e-3` -> two values, `[q,v]` -> one."""
    values, current, depth, quote = [], [], 0, None
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    values.append("".join(current))
    if any(v == "" for v in values) and len(values) > 1:
        raise ValueError(f"empty value in {value!r}")
    return values


def build_grid(overrides: list[str], recipe_axes: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(fixed overrides, one override list per job) from the recipe's sweep (`recipe_axes`: its
    hydra.sweeper.params, which --multirun sweeps) and the command-line overrides, as Hydra's multirun combines
    them: the recipe's axes first, a key given on the command line replacing the recipe's values in their place."""
    grid = {key: split_values(value) for key, value in (recipe_axes or {}).items()}
    for item in overrides:
        if item.startswith("-"):
            raise ValueError(f"{item!r}: options go before the overrides, and --multirun/-m is not used here")
        if "=" not in item:
            raise ValueError(f"{item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.lstrip("+~") in RESERVED:
            raise ValueError(f"{key} is set by the sweep launcher (use --sweep-dir)")
        grid[key] = split_values(value)
    fixed = [f"{key}={values[0]}" for key, values in grid.items() if len(values) == 1]
    axes = [[f"{key}={v}" for v in values] for key, values in grid.items() if len(values) > 1]
    jobs = [list(combo) for combo in itertools.product(*axes)] if axes else [[]]
    return fixed, jobs


def recipe_axes_of(overrides: list[str]) -> dict[str, str]:
    """The sweep that the recipe of these overrides declares, read from the config of the grid's first job; none
    where that config does not compose (check_jobs then reports why, one line)."""
    from kasa.cli.common import recipe_sweep_axes

    fixed, jobs = build_grid(overrides)
    try:
        return recipe_sweep_axes(fixed + jobs[0])
    except Exception:  # noqa: BLE001 - Hydra's composition errors, reported by check_jobs on the same config
        return {}


def check_jobs(fixed: list[str], jobs: list[list[str]], sweep_dir: Path) -> list[int]:
    """Compose and check every job as a --multirun does (kasa.training.preflight.check_sweep_job), and its folder
    (<sweep_dir>/<i>) as kasa-train does when it starts (check_finished_run, on the resolved config as kasa-train
    resolves it): the first job whose config would fail is a ValueError naming it, and every job whose folder holds
    a finished run that the job would refuse (other settings, or no resume=auto) is one line of a ValueError (one
    message per such job in its args), before any job has run. Returns the jobs whose folders hold their own
    finished runs (resume=auto leaves them as they are: skipped)."""
    from kasa.cli.common import USER_ERRORS, compose_resolved, describe_error
    from kasa.config import validate
    from kasa.training.preflight import check_finished_run, check_sweep_job

    checked_models: set[str] = set()
    finished: list[int] = []
    refused: list[str] = []
    for i, job in enumerate(jobs):
        name = f"job {i} ({' '.join(job) or 'no axis'})"
        try:
            resolved = compose_resolved([*fixed, *job], str(sweep_dir / str(i)))
            cfg = validate(resolved)
            check_sweep_job(cfg, checked_models)
        except USER_ERRORS as err:
            raise ValueError(f"{name}: {describe_error(err)}; no job has run") from err
        try:
            if check_finished_run(cfg, sweep_dir / str(i), resolved) is not None:
                finished.append(i)
        except USER_ERRORS as err:
            refused.append(f"{name}: {describe_error(err)}; no job has run")
    if refused:
        raise ValueError(*refused)
    return finished


class JobSignals(HandlingStopSignals):
    """The stop signals while the sweep runs: the first is passed on to the job under way (its process group), which
    saves and exits, and the sweep stops after it; a second kills the job at once and exits."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.job: subprocess.Popen | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        running = self.job is not None and self.job.poll() is None
        if self.received is not None:
            print(f"{name} again: stopping the sweep at once, its job without a checkpoint", file=sys.stderr,
                  flush=True)
            if running:
                os.killpg(self.job.pid, signal.SIGKILL)
            os._exit(128 + signum)
        self.received = signum
        print(f"{name}: " + ("the job under way saves a resumable checkpoint and stops, then the sweep stops"
                             if running else "the sweep stops") + " (send it again to stop at once)",
              file=sys.stderr, flush=True)
        if running:
            os.killpg(self.job.pid, signum)


def stop_with_parent(parent: int) -> Callable[[], None] | None:
    """For a job's process, run before it starts (Linux): SIGTERM when `parent`, this script, dies, even of SIGKILL (an
    out-of-memory kill, a scheduler's): the job saves a resumable checkpoint and stops, where it trained on orphaned
    and the sweep run again found its folder in use. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None

    def set_parent_death_signal() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the script died before the signal was set up
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python scripts/sweep_launch.py", allow_abbrev=False,  # a flag's prefix is unknown, not that flag
        description="Outer sweep for multi-process kasa-train jobs: every job's config checked first, then one launch "
        "per combination (each with resume=auto: run it again to continue a sweep), then the summary.",
        epilog="Overrides: key=value for every job, key=v1,v2,... for a sweep axis.",
    )
    parser.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                        help=f"command that runs the training module, split like a shell line (default: "
                             f"{DEFAULT_LAUNCHER!r}); e.g. 'accelerate launch --config_file "
                             "configs/accelerate/multi_gpu.json -m kasa.cli.train' or 'python -m kasa.cli.train'")
    parser.add_argument("--sweep-dir", type=Path, default=None,
                        help="where the jobs go, one numbered folder each (default: runs/sweeps/<time>)")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failed job")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; comma-separated values make sweep axes")
    args = parser.parse_args(argv)

    try:
        fixed, jobs = build_grid(args.overrides, recipe_axes_of(args.overrides))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    launcher = shlex.split(args.launcher)
    if not launcher:
        print("error: --launcher is empty", file=sys.stderr)
        return 2
    if shutil.which(launcher[0]) is None:  # found now, not after the checks, with the sweep's folder made
        print(f"error: --launcher {args.launcher!r}: no program {launcher[0]!r} on PATH: check its spelling, or "
              f"install it (e.g. {DEFAULT_LAUNCHER!r}, or 'python -m kasa.cli.train' for one process)",
              file=sys.stderr)
        return 2
    sweep_dir = args.sweep_dir or Path("runs/sweeps") / time_stamp()
    sweep_dir = sweep_dir.absolute()
    starting = [] if any(o.startswith(("resume=", "overwrite=")) for o in fixed + sum(jobs, [])) else ["resume=auto"]
    try:
        from kasa.training.preflight import check_not_a_run

        check_not_a_run(sweep_dir, "--sweep-dir")
        finished = check_jobs([*fixed, *starting], jobs, sweep_dir)
    except ValueError as err:
        for message in err.args:  # one line per job refused
            print(f"error: {message}", file=sys.stderr)
        return 2
    commands = [launcher + fixed + job + starting + [f"hydra.run.dir={sweep_dir / str(i)}"]
                for i, job in enumerate(jobs)]
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / SWEEP_JOBS_FILE).is_file():  # marks the folder as a sweep's before the first job starts
        write_json(sweep_dir / SWEEP_JOBS_FILE, [])
    records: list[dict] = []
    failed = 0
    env = {**os.environ, FORWARDED_SIGNALS_ENV: "1"}  # this script handles a repeated signal itself
    with JobSignals() as stop:
        for i, (job, command) in enumerate(zip(jobs, commands)):
            if stop.received is not None:
                break
            record = {"job": i, "overrides": fixed + job, "command": shlex.join(command),
                      "run_dir": str(sweep_dir / str(i))}
            if i in finished:
                print(f"[{i + 1}/{len(jobs)}] {' '.join(job) or '(no axis)'}: already finished, skipped", flush=True)
                records.append(record | {"returncode": 0, "skipped": True})
                write_json(sweep_dir / SWEEP_JOBS_FILE, records)
                continue
            print(f"[{i + 1}/{len(jobs)}] {' '.join(job) or '(no axis)'}", flush=True)
            start = time.perf_counter()
            try:
                stop.job = subprocess.Popen(command, env=env, start_new_session=True,
                                            preexec_fn=stop_with_parent(os.getpid()))
            except OSError as err:  # the launcher itself cannot be started (accelerate not installed, a typo)
                print(f"error: cannot run {launcher[0]!r}: {err}", file=sys.stderr)
                return 2
            returncode = stop.job.wait()
            records.append(record | {"returncode": returncode, "seconds": round(time.perf_counter() - start, 1)})
            write_json(sweep_dir / SWEEP_JOBS_FILE, records)
            if stop.received is not None and returncode != 0:
                # the job saved and stopped, as asked: kasa-train exits 75, accelerate's launcher 128 + the signal
                print(f"job {i} stopped (exit status {returncode})", file=sys.stderr, flush=True)
                break
            if returncode != 0:
                failed += 1
                print(f"job {i} failed with exit status {returncode}: {shlex.join(command)}", file=sys.stderr,
                      flush=True)
                if args.stop_on_error:
                    break

    from kasa.analysis.sweep import summarize_sweep

    summary = summarize_sweep(sweep_dir)
    done = sum(1 for record in records if record["returncode"] == 0)
    print(f"sweep summary: {summary} ({done} of {len(jobs)} jobs finished)")
    if stop.received is not None:
        given = sys.argv[1:] if argv is None else argv
        pinned = [] if any(a == "--sweep-dir" or a.startswith("--sweep-dir=") for a in given) else [
            "--sweep-dir", str(sweep_dir)]  # not a new time-stamped folder: this sweep's
        command = shlex.join(["python", sys.argv[0] if argv is None else __file__, *pinned, *given])
        print(f"stopped by {signal.Signals(stop.received).name}; continue the sweep with: {command}", file=sys.stderr)
        return INTERRUPTED_EXIT
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
