"""kasa-train: compose a run with Hydra (recipe + overrides), validate it, train.

    kasa-train                                          offline demo (MiniLM-L6, shipped sentiment data)
    kasa-train task=glue/cola model=roberta_base        no recipe: the trainer's defaults
    kasa-train recipe=glue/roberta_base_cola method.beta=1e-3
    kasa-train --multirun recipe=... method.beta=1e-4,1e-3 method.gamma=1e-4,1e-3 seed=0,1,2
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, flag_override, open_dict

from kasa.cli.common import (
    USER_ERRORS,
    default_to_demo,
    describe_error,
    fail,
    quiet_libraries,
    register_resolvers,
    run_reporting_errors,
)
from kasa.config import launch_rank, resolve, validate
from kasa.run_dir import remove_if_empty, resumable_checkpoints
from kasa.training.preflight import check_finished_run, check_not_a_run, check_sweep_job
from kasa.training.signals import (
    INTERRUPTED_EXIT,
    STOP_SIGNALS,
    TrainingInterrupted,
    ignore_stop_signals,
    interrupted_message,
    resume_command,
    stop_outside_a_run,
)

BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}"  # hydra.sweeper._target_ of the default

log = logging.getLogger(__name__)


FAILED_SWEEP_JOBS: list[str] = []
"""The jobs of this process's --multirun that stopped with an error (their run directory and the error's line)."""

CREATED_PARENTS: list[Path] = []
"""The parents of this process's run folder that did not exist before Hydra made it, the deepest first."""

SWEEP_DIR: list[Path] = []
"""The folder of this process's --multirun, once it has started."""


def _run(cfg: DictConfig) -> float:
    hydra_config = HydraConfig.get()
    sweep_dir = Path(hydra_config.sweep.dir) if hydra_config.mode == RunMode.MULTIRUN else None

    def job() -> float:
        from kasa.run_dir import OVERRIDES_KEY

        run_dir = Path(str(cfg.output_dir))
        try:  # from the start: a resume stopped while its config is checked (torch imports for seconds) exits 75
            resolved = resolve(cfg)
            run_cfg = validate(resolved)
            from kasa.training.preflight import check_config_values, unused_override_warnings

            check_config_values(run_cfg)  # the loop's first check too: here a bad value is refused in a second, not six
            if launch_rank()[0] == 0:
                for line in unused_override_warnings(run_cfg, list(hydra_config.overrides.task)):
                    print(line, file=sys.stderr)
            resolved[OVERRIDES_KEY] = list(hydra_config.overrides.task)
            # What Hydra itself would write into .hydra/ before the job (hydra.output_subdir is null): kasa writes it
            # only once the run is accepted, so a refused run leaves a finished run's record untouched.
            hydra_files = {"config.yaml": OmegaConf.to_yaml(cfg),
                           "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
                           "overrides.yaml": OmegaConf.to_yaml(hydra_config.overrides.task)}
            quiet_libraries()
            from kasa.training.loop import train  # heavy imports (torch, transformers, accelerate) once it is valid

            best = train(run_cfg, resolved, hydra_files)["best"]
        except TrainingInterrupted as err:  # a stop signal stops a whole sweep too
            ignore_stop_signals()
            if err.checkpoint is None and sweep_dir is None and not resumable_checkpoints(run_dir):
                _stopped_before_training(err.signum)  # while a fresh run loaded: 75 would say "saved, resume me"
            if launch_rank()[0] == 0:  # one line for a launch of several processes, not one each
                print(interrupted_message(err, sys.argv, run_dir, sweep_dir), file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT)
        if sweep_dir is None:  # finished and written: a signal during the interpreter's teardown changes nothing
            ignore_stop_signals()
        return best

    if sweep_dir is None:
        try:
            return run_reporting_errors(job)
        except BaseException:  # Hydra made the run's folder before its config could be refused: none stays empty
            for folder in (Path(hydra_config.runtime.output_dir), *CREATED_PARENTS):
                if folder.exists() and not remove_if_empty(folder):  # gone: kasa removed it with its lock file
                    break
            raise
    # One job's error (a diverging setting, a full disk, an unreachable judge) must not cost the sweep's other jobs:
    # it is reported now, and again when the sweep ends, which then exits with status 2.
    try:
        return job()
    except USER_ERRORS as err:
        if os.environ.get("KASA_DEBUG"):
            raise
        message, run_dir = describe_error(err), hydra_config.runtime.output_dir
        print(f"error: {message}", file=sys.stderr)
        FAILED_SWEEP_JOBS.append(message if run_dir in message else f"{run_dir}: {message}")
        return math.nan


class TrainCallback(Callback):
    """Before a run starts, note which of its folder's parents Hydra is about to create (a refused start removes
    them, empty, with the folder). Before a --multirun starts, check its folder (not a run's) and every job's config
    (a bad value in the last combination must not wait for the others to train); after it, write the sweep summary
    (markdown, CSV, beta x gamma heatmap) and report the jobs that failed."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # the folder's name reads ${task.name}, unset after `~task`: exit here, as below (not Hydra's warning)
            run_dir = Path(config.hydra.run.dir)
        except USER_ERRORS as err:
            fail(describe_error(err))
        CREATED_PARENTS[:] = [parent for parent in run_dir.parents if not parent.exists()]

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        FAILED_SWEEP_JOBS.clear()
        try:  # its default name reads ${task.name}, unset after `~task`: exit here, as below (not Hydra's warning)
            SWEEP_DIR[:] = [Path(config.hydra.sweep.dir)]
        except USER_ERRORS as err:
            fail(describe_error(err))
        # Hydra resolves the folder again in each job's config, where ${task.name} is that job's: the jobs of a sweep
        # over tasks went to a folder per task and the summary to a third. Pinned here as the user would pin it.
        with flag_override(config, "readonly", False), open_dict(config):
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={SWEEP_DIR[0]}")
        try:  # before Hydra creates the sweep's folder or writes multirun.yaml into it
            check_not_a_run(Path(config.hydra.sweep.dir))
        except ValueError as err:  # exit here, as below: Hydra turns a callback's exception into a warning
            fail(describe_error(err))
        if config.hydra.sweeper._target_ != BASIC_SWEEPER:  # other sweepers choose their values as they go
            return
        loader = GlobalHydra.instance().config_loader()
        params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
        try:  # exit here, as below: Hydra turns a callback's exception into a warning
            overrides = OverridesParser.create(config_loader=loader).parse_overrides(
                [*params, *config.hydra.overrides.task])
            jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        except USER_ERRORS as err:  # a sweep the basic sweeper cannot run, e.g. interval(...)
            fail(f"{describe_error(err)}: --multirun sweeps lists of values (key=a,b,c), range(...) and choice(...)")
        swept = tuple(f"{o.get_key_element()}=" for o in overrides if o.is_sweep_override())
        checked_models: set[str] = set()
        for number, job_overrides in enumerate(jobs):
            try:
                job_config = loader.load_sweep_config(config, list(job_overrides))
                HydraConfig.instance().set_config(job_config)  # ${hydra:runtime.choices.recipe} resolves from it
                with open_dict(job_config):
                    if not OmegaConf.is_missing(job_config, "output_dir"):  # output_dir=??? is said by validate
                        job_config.output_dir = str(Path(config.hydra.sweep.dir) / str(number))  # the default subdir
                    del job_config["hydra"]
                resolved = resolve(job_config)
                job_cfg = validate(resolved)
                check_sweep_job(job_cfg, checked_models)
                check_finished_run(job_cfg, Path(job_config.output_dir), resolved)  # one left as it is, or refused
            except USER_ERRORS as err:  # exit here: Hydra turns a callback's exception into a warning
                values = " ".join(o for o in job_overrides if o.startswith(swept))
                fail(f"sweep job #{number} ({values}): {describe_error(err)}; no job has run")
        HydraConfig.instance().set_config(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kasa.analysis.sweep import summarize_sweep

        path = summarize_sweep(Path(config.hydra.sweep.dir))
        log.info("sweep summary: %s", path)
        ignore_stop_signals()  # every job has ended and the summary is written: a signal now changes nothing
        if FAILED_SWEEP_JOBS:
            shown = "; ".join(FAILED_SWEEP_JOBS[:3]) + ("; ..." if len(FAILED_SWEEP_JOBS) > 3 else "")
            command = resume_command(sys.argv, Path(config.hydra.sweep.dir), sweep=True)
            fail(f"{len(FAILED_SWEEP_JOBS)} sweep job(s) failed ({shown}): fix the cause, then continue the sweep "
                 f"(its finished jobs are kept) with: {command}")


def _prepare_multiprocess_launch(argv: list[str]) -> None:
    """Under a multi-process launcher (accelerate launch, torchrun: WORLD_SIZE > 1) every rank runs Hydra. They must
    agree on one run directory (the default one is time-stamped by each rank on its own), Hydra's multirun cannot
    sit inside the ranks (scripts/sweep_launch.py is the outer sweep)."""
    if launch_rank()[1] <= 1 or any(a in ("--cfg", "-c", "--help", "-h", "--info") for a in argv):
        return
    if any(a in ("--multirun", "-m") for a in argv):
        fail("--multirun cannot run inside a multi-process launch (every rank would run the whole sweep): "
             "use python scripts/sweep_launch.py --launcher '<accelerate launch ...> -m kasa.cli.train' key=v1,v2")
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        fail("a multi-process launch needs hydra.run.dir=<run dir> (each rank would time-stamp a directory of its "
             "own): add it after the training module's other overrides")


def _check_flags_first(args: list[str]) -> None:
    """Hydra reads its flags (--multirun, --cfg job, ...) only before the key=value overrides; after one, argparse
    stopped with a usage block naming the overrides (and the recipe=demo kasa adds) as unrecognized."""
    first_override = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    if any(a in ("--cfg", "-c") for a in args[first_override - 1:first_override]):
        fail(f"{args[first_override - 1]} needs the part of the config to print, job, hydra or all, before the "
             "overrides: e.g. kasa-train --cfg job recipe=glue/roberta_base_cola")
    part = next((args[i + 1] for i, a in enumerate(args[:first_override - 1]) if a in ("--cfg", "-c")), None)
    if part is not None and part not in ("job", "hydra", "all"):  # argparse's 7-line usage block said so
        fail(f"--cfg {part}: the part of the config to print is job, hydra or all, e.g. kasa-train --cfg job "
             "recipe=glue/roberta_base_cola")
    late = next((a for a in args[first_override:] if a.startswith("-")), None)
    if late is not None:
        moved = [late, *(a for a in args if a != late)] if late in ("--multirun", "-m") else None
        example = f" (kasa-train {' '.join(moved)})" if moved else ""
        fail(f"{late} comes after the key=value overrides, where Hydra does not read it: put it, with its value if "
             f"it takes one, before them{example}")


def main() -> None:
    if sys.argv[1:2] == ["--version"]:  # Hydra's own flag printed Hydra's version
        from kasa import __version__

        print(f"kasa {__version__}")
        return
    _prepare_multiprocess_launch(sys.argv)
    _check_flags_first(sys.argv[1:])
    if "--hydra-help" not in sys.argv:  # the help of Hydra's own config, which has no recipe to choose
        sys.argv[1:] = default_to_demo(sys.argv[1:])
    register_resolvers()
    # Hydra raises its composition errors (unknown recipe, key typo, unparsable override, a run directory it cannot
    # create) instead of printing its own multi-line report with exit status 1: they become one line, status 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    for signum in STOP_SIGNALS:  # until a run sets up its own (the process died silently with 143 here)
        signal.signal(signum, stop_outside_a_run)
    try:
        run_reporting_errors(_hydra_main)
    except TrainingInterrupted as err:  # no run's stop signals were set up: at the start, or between sweep jobs
        _interrupted_outside_a_run(err.signum)
    if launch_rank()[1] > 1:
        # A process of a multi-process launch, its run finished and its files written: at interpreter teardown a
        # gloo thread still joinable after destroy_process_group aborted a rank now and then ("terminate called
        # without an active exception", SIGABRT), and the launch reported a finished run as failed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _stopped_before_training(signum: int) -> NoReturn:
    # a signal that cut torch's import short left its loggers unset: its exit hooks logged cache statistics at INFO
    logging.disable(logging.INFO)
    if launch_rank()[0] == 0:  # one line for a launch of several processes, not one each
        print(f"stopped by {signal.Signals(signum).name} before training started: nothing was trained or saved",
              file=sys.stderr)
    sys.exit(128 + signum)


def _interrupted_outside_a_run(signum: int) -> NoReturn:
    """One line for a stop signal that reached no run (before its training could start, or between a sweep's jobs),
    where Python printed a KeyboardInterrupt traceback (SIGINT) or the process died without a word (SIGTERM)."""
    ignore_stop_signals()
    if not SWEEP_DIR:
        _stopped_before_training(signum)
    command = resume_command(sys.argv, SWEEP_DIR[0], sweep=True)
    print(f"stopped by {signal.Signals(signum).name} between the sweep's jobs; continue with: {command}",
          file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT)


def _hydra_main() -> None:
    try:
        hydra.main(config_path="pkg://kasa.conf", config_name="config", version_base="1.3")(_run)()
    except OSError as err:  # only Hydra's own file operations get here: the job reports its errors itself
        if isinstance(err, HydraException):  # MissingConfigException is an OSError too
            raise
        raise ValueError(f"cannot create the run directory ({err.strerror}: {err.filename}): choose another "
                         "hydra.run.dir") from err


if __name__ == "__main__":  # python -m kasa.cli.train: run the imported module, where the sweep callback (named by
    from kasa.cli.train import main as imported_main  # its import path) looks for the failed jobs

    imported_main()
