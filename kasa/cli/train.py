"""kasa-train: compose a run with Hydra (recipe + overrides), validate it, train.

    kasa-train                                          offline demo (MiniLM-L6, shipped sentiment data)
    kasa-train task=glue/cola model=roberta_base        no recipe: the trainer's defaults
    kasa-train recipe=glue/roberta_base_cola method.beta=1e-3
    kasa-train --multirun recipe=... method.beta=1e-4,1e-3 method.gamma=1e-4,1e-3 seed=0,1,2
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kasa.cli.common import default_to_demo, fail, quiet_libraries, register_resolvers, run_reporting_errors

log = logging.getLogger(__name__)


def _run(cfg: DictConfig) -> float:
    def job() -> float:
        from kasa.config import resolve, validate
        from kasa.run_dir import OVERRIDES_KEY

        quiet_libraries()
        resolved = resolve(cfg)
        run_cfg = validate(resolved)
        from kasa.training.loop import train  # heavy imports (transformers' trainer, peft) once the config is valid
        from kasa.training.signals import INTERRUPTED_EXIT, TrainingInterrupted, interrupted_message

        resolved[OVERRIDES_KEY] = list(HydraConfig.get().overrides.task)
        # What Hydra itself would write into .hydra/ before the job (hydra.output_subdir is null): kasa writes it
        # only once the run is accepted, so a refused run leaves a finished run's record untouched.
        hydra_files = {"config.yaml": OmegaConf.to_yaml(cfg),
                       "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
                       "overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task)}
        try:
            return train(run_cfg, resolved, hydra_files)["best"]
        except TrainingInterrupted as err:
            print(interrupted_message(err, sys.argv, Path(run_cfg.output_dir)), file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT)

    return run_reporting_errors(job)


class SweepSummaryCallback(Callback):
    """After a --multirun finishes, write the sweep summary (markdown, CSV, beta x gamma heatmap)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kasa.analysis.sweep import summarize_sweep

        path = summarize_sweep(Path(config.hydra.sweep.dir))
        log.info("sweep summary: %s", path)


def _prepare_multiprocess_launch(argv: list[str]) -> None:
    """Under a multi-process launcher (accelerate launch, torchrun: WORLD_SIZE > 1) every rank runs Hydra. They must
    agree on one run directory (the default one is time-stamped by each rank on its own), Hydra's multirun cannot
    sit inside the ranks (scripts/sweep_launch.py is the outer sweep)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a in ("--cfg", "-c", "--help", "-h", "--info") for a in argv):
        return
    if any(a in ("--multirun", "-m") for a in argv):
        fail("--multirun cannot run inside a multi-process launch (every rank would run the whole sweep): "
             "use python scripts/sweep_launch.py --launcher '<accelerate launch ...> -m kasa.cli.train' key=v1,v2")
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        fail("a multi-process launch needs hydra.run.dir=<run dir> (each rank would time-stamp a directory of its "
             "own): add it after the training module's other overrides")


def main() -> None:
    _prepare_multiprocess_launch(sys.argv)
    sys.argv[1:] = default_to_demo(sys.argv[1:])
    register_resolvers()
    # Hydra raises its composition errors (unknown recipe, key typo, unparsable override, a run directory it cannot
    # create) instead of printing its own multi-line report with exit status 1: they become one line, status 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    run_reporting_errors(_hydra_main)


def _hydra_main() -> None:
    try:
        hydra.main(config_path="pkg://kasa.conf", config_name="config", version_base="1.3")(_run)()
    except OSError as err:  # only Hydra's own file operations get here: the job reports its errors itself
        if isinstance(err, HydraException):  # MissingConfigException is an OSError too
            raise
        raise ValueError(f"cannot create the run directory ({err.strerror}: {err.filename}): choose another "
                         "hydra.run.dir") from err


if __name__ == "__main__":
    main()
