"""The learning-rate schedules of `trainer.scheduler`: a linear warmup from 0 over the warmup steps, then the named
decay to the last step. The factors are those of transformers' schedules of the same names (linear, cosine: the same
floats), except that `constant` keeps the warmup as every schedule here does (transformers' `constant` drops it).

kasa computes them itself because `transformers.get_scheduler` imports transformers' Trainer utilities, and with them
peft and bitsandbytes: 4-5 s at the start of every process, for three formulas.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the choices are checked before torch loads (kasa-train --help and --cfg never import it)
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LambdaLR


def _linear(step: int, warmup: int, total: int) -> float:
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, warmup: int, total: int) -> float:
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _constant(step: int, warmup: int, total: int) -> float:
    return 1.0


DECAYS: dict[str, Callable[[int, int, int], float]] = {"linear": _linear, "cosine": _cosine, "constant": _constant}
"""trainer.scheduler's choices: the factor of the learning rate at an optimiser step after the warmup."""


def lr_factor(step: int, *, decay: str, warmup: int, total: int) -> float:
    """The factor of the configured learning rate at optimiser step `step` (0-based) of `total`."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return DECAYS[decay](step, warmup, total)


def build_scheduler(optimizer: Optimizer, decay: str, warmup: int, total: int) -> LambdaLR:
    """A LambdaLR over `lr_factor`; its state (the step count) saves and loads as transformers' schedules' does."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, partial(lr_factor, decay=decay, warmup=warmup, total=total))
