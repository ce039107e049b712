"""Experiment trackers (`logging.trackers`: tensorboard, wandb, mlflow) through Accelerate's trackers.

Each run starts one tracker run named after its task, method and run directory, with the resolved config as its
hyperparameters (a sweep's jobs side by side: W&B's group and MLflow's `kasa.sweep` tag name the sweep's folder);
the loop then logs the losses (task loss, KaSA's L2, L3 and their weighted sum), the learning rate and the
evaluation metrics. Credentials come from the trackers' own environment variables (WANDB_API_KEY,
MLFLOW_TRACKING_URI, ...), which kasa never reads into its config or writes anywhere. Where they write:
TensorBoard into `<run dir>/tensorboard/`, W&B into `<run dir>/wandb/` unless WANDB_DIR is set (WANDB_MODE=offline
works without an account), MLflow to MLFLOW_TRACKING_URI (or MLflow's default).

A resumed run continues its W&B and MLflow runs (their ids are kept in `<run dir>/trackers.json`) and its TensorBoard
log (its folder, recorded there too) instead of starting new ones; their hyperparameters stay those of the run's
start, stored once (MLflow's cannot change; `config.json` records the settings a resume changed). What a resume
logs again after its checkpoint goes to `metrics.jsonl` only: the trackers have it from before the interruption."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

from accelerate import Accelerator

from kasa.run_dir import TENSORBOARD_DIR, TRACKERS_FILE, WANDB_DIR, sweep_record

PROJECT = "kasa"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# MLflow retries a server it cannot reach 7 times, its pauses doubling (about 5 minutes), before it says so: a start
# tries twice and waits 20 s for an answer instead, unless these are set; the run's own logging keeps MLflow's defaults
MLFLOW_START_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
RESUMABLE = ("wandb", "mlflow", "tensorboard")  # tracker runs a later session continues: by id, TensorBoard's by
# its folder (relative to the run directory), which already holds the run's hyperparameters


def check_trackers(names: list[str]) -> list[str]:
    """`names`, checked before anything loads: known trackers whose packages are installed."""
    for name in names:
        if name not in PACKAGES:
            raise ValueError(f"unknown tracker {name!r} in logging.trackers; choose from {', '.join(PACKAGES)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"logging.trackers includes {name} but the {PACKAGES[name]} package is not installed: "
                             f"pip install {PACKAGES[name]}")
    return list(dict.fromkeys(names))


def hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The config flattened to `section.key` scalars (lists and nulls as JSON text): what every tracker accepts."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= hyperparameters(value, f"{name}.")
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def start_trackers(accelerator: Accelerator, names: list[str], config: dict[str, Any], out: Path,
                   resumed_ids: dict[str, str] | None = None) -> dict[str, str]:
    """One tracker run per configured tracker (main process only, as Accelerate does), with the run's config; or,
    for the trackers in `resumed_ids` (what the run's earlier session recorded), that tracker run continued. Returns
    the ids of the W&B and MLflow runs, for `trackers.json`."""
    if not names:
        return {}
    resumed_ids = resumed_ids or {}
    run_name = f"{config.get('task', {}).get('name')}/{config.get('method', {}).get('method')}/{out.name}"
    wandb: dict[str, Any] = {"name": run_name}
    if "wandb" in resumed_ids:
        wandb |= {"id": resumed_ids["wandb"], "resume": "allow"}
    if "WANDB_DIR" not in os.environ:  # beside the run's other files
        wandb["dir"] = str(out)
    if not {"WANDB_QUIET", "WANDB_SILENT"} & set(os.environ):  # W&B's own lines down to where the run is, not its
        wandb["settings"] = {"quiet": True}  # 30-line history and summary printed amid kasa's console at the end
    mlflow: dict[str, Any] = {"run_name": run_name, "run_id": resumed_ids.get("mlflow")}
    if sweep_record(out.parent) is not None:  # a --multirun job: the sweep's runs side by side
        sweep = out.parent.resolve()
        wandb["group"] = f"{sweep.parent.name}/{sweep.name}"
        mlflow["tags"] = {"kasa.sweep": str(sweep)}
    written_before = tracker_files(out)
    try:
        with _environment_defaults(MLFLOW_START_LIMITS if "mlflow" in names else {}), _quiet_retries():
            accelerator.init_trackers(PROJECT, init_kwargs={"wandb": wandb, "mlflow": mlflow})
        for tracker in accelerator.trackers:  # none on the other processes
            if tracker.name not in resumed_ids:
                tracker.store_init_configuration(hyperparameters(config))
    except Exception as err:  # the tracker's own error: a store it refuses, no login, a server it cannot reach
        # a refused start leaves nothing: the trackers that did start are closed and their new files removed (a
        # TensorBoard log would otherwise sit beside the next start's in the same folder)
        end_trackers(accelerator, interrupted=False)
        accelerator.trackers.clear()  # closed: the failed run's own ending (end_trackers) finds none to close again
        remove_tracker_files(tracker_files(out) - written_before)
        name = _failing_tracker(err, names)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = re.sub(r"(?<=://)[^/\s@]+@", "***@", message)  # a URI's user:password (MLFLOW_TRACKING_URI's)
        fresh = f", or remove {out / TRACKERS_FILE} to start new tracker runs" if name in resumed_ids else ""
        raise ValueError(f"cannot start the {name} tracker of logging.trackers ({message}): fix its settings (its "
                         f"environment variables){fresh}, or leave it out of logging.trackers") from err
    if not accelerator.is_main_process:
        return {}
    runs = {tracker.name: tracker.tracker for tracker in accelerator.trackers}  # wandb's Run, mlflow's ActiveRun
    ids = {}
    if "wandb" in runs:
        ids["wandb"] = runs["wandb"].id
    if "mlflow" in runs:
        ids["mlflow"] = runs["mlflow"].info.run_id
    if "tensorboard" in runs:  # its SummaryWriter
        ids["tensorboard"] = os.path.relpath(runs["tensorboard"].log_dir, out)
    return ids


@contextlib.contextmanager
def _environment_defaults(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ, for the variables that are not set, within the block."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """urllib3's warning for each retry of a tracker's server held back within the block: a start that cannot reach
    the server ends in one error line that says so, and the retries before it printed one line each."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tracker_files(out: Path) -> set[Path]:
    """What the trackers have written into the run directory (TensorBoard's and W&B's folders), files and folders."""
    return {path for folder in (out / TENSORBOARD_DIR, out / WANDB_DIR) if folder.is_dir()
            for path in (folder, *folder.rglob("*"))}


def remove_tracker_files(paths: set[Path], keep_links: bool = False) -> None:
    """`paths` (from tracker_files) removed, a folder after what it holds and only once empty: what a later tracker
    run wrote beside them stays. The links at the top of W&B's folder (latest-run, debug.log) point at its newest
    run: `keep_links` keeps them, which a newer run has taken over. What cannot go stays (the caller has a more
    useful error to give)."""
    for path in sorted(paths, reverse=True):
        if keep_links and path.is_symlink() and path.parent.name == WANDB_DIR:
            continue
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()


def recorded_tracker_ids(out: Path) -> dict[str, str]:
    """The tracker runs' ids that the run in `out` recorded ({} when none, or unreadable: new tracker runs)."""
    try:
        ids = json.loads((out / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    recorded = {name: ids[name] for name in RESUMABLE if isinstance(ids, dict) and isinstance(ids.get(name), str)}
    if "tensorboard" in recorded and not (out / recorded["tensorboard"]).is_dir():  # removed since: a new log
        del recorded["tensorboard"]
    return recorded


def _failing_tracker(err: Exception, names: list[str]) -> str:
    """Which tracker raised `err`: the package of its type, else of the innermost frame in a tracker's package (MLflow
    raises plain Exceptions too), else the only one configured."""
    candidates = [{type(err).__module__.split(".")[0]}]
    candidates += [set(Path(frame.filename).parts) for frame in reversed(traceback.extract_tb(err.__traceback__))]
    for found in candidates:
        name = next((n for n in names if PACKAGES[n] in found), None)
        if name is not None:
            return name
    return names[0] if len(names) == 1 else "a"


def end_trackers(accelerator: Accelerator, interrupted: bool) -> None:
    """Close the tracker runs of a run that failed, or was `interrupted` by a stop signal (to be resumed), so that
    the next job of a --multirun in this process starts runs of its own (MLflow refuses a second active run). A run
    that finishes closes them in `Accelerator.end_training`."""
    for tracker in accelerator.trackers:  # none on the other processes
        if getattr(tracker, "tracker", None) is None:  # never started: its start is what failed
            continue
        try:
            if tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="KILLED" if interrupted else "FAILED")
            elif tracker.name == "wandb":
                tracker.tracker.finish(exit_code=1)
            else:
                tracker.finish()
        except Exception as err:  # the run's own error is the one to report
            print(f"warning: could not close the {tracker.name} tracker run ({err})", file=sys.stderr)
    accelerator.trackers.clear()
