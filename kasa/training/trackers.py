"""Experiment trackers (`logging.trackers`: tensorboard, wandb, mlflow) through Accelerate's trackers.

Each run starts one tracker run named after its task, method and run directory, with the resolved config as its
hyperparameters; the loop then logs the losses (task loss, KaSA's L2, L3 and their weighted sum), the learning rate
and the evaluation metrics. Credentials come from the trackers' own environment variables (WANDB_API_KEY,
MLFLOW_TRACKING_URI, ...), which kasa never reads into its config or writes anywhere. Where they write:
TensorBoard into `<run dir>/tensorboard/`, W&B into `<run dir>/wandb/` unless WANDB_DIR is set (WANDB_MODE=offline
works without an account), MLflow to MLFLOW_TRACKING_URI (or MLflow's default)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

PROJECT = "kasa"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


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


def start_trackers(accelerator: Accelerator, names: list[str], config: dict[str, Any], out: Path) -> None:
    """One tracker run per configured tracker (main process only, as Accelerate does), with the run's config."""
    if not names:
        return
    run_name = f"{config.get('task', {}).get('name')}/{config.get('method', {}).get('method')}/{out.name}"
    init_kwargs: dict[str, dict[str, Any]] = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
    if "WANDB_DIR" not in os.environ:  # beside the run's other files
        init_kwargs["wandb"]["dir"] = str(out)
    try:
        accelerator.init_trackers(PROJECT, config=hyperparameters(config), init_kwargs=init_kwargs)
    except Exception as err:  # the tracker's own error: a store it refuses, no login, a server it cannot reach
        package = type(err).__module__.split(".")[0]
        name = next((n for n in names if PACKAGES[n] == package), "a")
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot start the {name} tracker of logging.trackers ({message}): fix its settings (its "
                         "environment variables), or leave it out of logging.trackers") from err
