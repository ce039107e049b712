"""kasa-train: compose a run with Hydra (recipe + overrides), validate it, train.

    kasa-train                                          offline demo (MiniLM-L6, shipped sentiment data)
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
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kasa.cli.common import fail, quiet_libraries, register_resolvers, run_reporting_errors

log = logging.getLogger(__name__)


def _run(cfg: DictConfig) -> float:
    def job() -> float:
        from kasa.config import validate
        from kasa.training.loop import train  # heavy imports after the config is known to be valid

        quiet_libraries()
        run_cfg = validate(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["hydra_overrides"] = list(HydraConfig.get().overrides.task)
        return train(run_cfg, resolved)["best"]

    return run_reporting_errors(job)


class SweepSummaryCallback(Callback):
    """After a --multirun finishes, write the sweep summary (markdown, CSV, beta x gamma heatmap)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kasa.evaluation.sweep import summarize_sweep

        path = summarize_sweep(Path(config.hydra.sweep.dir))
        log.info("sweep summary: %s", path)


def _prepare_multiprocess_launch(argv: list[str]) -> None:
    """Under a multi-process launcher (accelerate launch, torchrun: WORLD_SIZE > 1) every rank runs Hydra. They must
    agree on one run directory (the default one is time-stamped by each rank on its own), Hydra's multirun cannot
    sit inside the ranks (scripts/sweep_launch.py is the outer sweep), and only rank 0 writes Hydra's .hydra/."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a in ("--cfg", "-c", "--help", "-h", "--info") for a in argv):
        return
    if any(a in ("--multirun", "-m") for a in argv):
        fail("--multirun cannot run inside a multi-process launch (every rank would run the whole sweep): "
             "use python scripts/sweep_launch.py --launcher '<accelerate launch ...> -m kasa.cli.train' key=v1,v2")
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        fail("a multi-process launch needs hydra.run.dir=<run dir> (each rank would time-stamp a directory of its "
             "own): add it after the training module's other overrides")
    if int(os.environ.get("RANK", "0")) != 0:
        argv.append("hydra.output_subdir=null")


def main() -> None:
    _prepare_multiprocess_launch(sys.argv)
    register_resolvers()
    hydra.main(config_path="pkg://kasa.conf", config_name="config", version_base="1.3")(_run)()


if __name__ == "__main__":
    main()
