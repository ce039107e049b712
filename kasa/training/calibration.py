"""Calibration examples from a task's training split, and the loss measurements that show what a truncation costs
(the start-of-training record in summary.json and kasa-inspect).

The examples come from one fixed permutation of the training split (seed 0, whatever the run's seed, so that the
runs of a sweep gather the same statistics and share the SVD cache): its first `method.calibration_samples`
examples give the second moments of the activation basis, the next ones are held out to measure losses."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from kasa.config import RunConfig

Batch = dict[str, torch.Tensor]
START_CHECK_EXAMPLES = 32  # held-out examples whose loss the training loop measures before and after truncation
DAMAGE_THRESHOLD = 0.05  # a relative loss increase above this is reported (kasa-train warns, kasa-inspect flags)


def split_size(rows: int, cfg: RunConfig) -> str:
    """The training split's size in the rows that calibration and the held-out losses take: packed rows under
    trainer.packing (each holds several examples), else examples; and task.max_train_samples where it cut the split
    (the data files may hold many more)."""
    size = f"{rows} packed rows (trainer.packing)" if cfg.trainer.packing else f"{rows} examples"
    cut = cfg.task.max_train_samples
    return size if cut is None else f"{size} after task.max_train_samples={cut}"


def more_rows(cfg: RunConfig) -> str:
    """The other fix of a training split too small for calibration, where the run's own setting cut it."""
    return "" if cfg.task.max_train_samples is None else ", or raise task.max_train_samples"


def calibration_rows(dataset: Dataset, cfg: RunConfig, held_out: int) -> tuple[list[int], list[int]]:
    """(calibration rows, held-out rows) of `dataset`: the calibration part is empty unless the method truncates in
    the activation basis; the held-out part has up to `held_out` rows. It needs the data only, so the commands call
    it before the model loads: a training split too small fails in seconds."""
    wanted = cfg.method.calibration_samples if cfg.method.truncation_basis == "activation" else 0
    if len(dataset) == 0:
        raise ValueError(f"the training split {cfg.task.train_split!r} is empty: there is nothing to calibrate on")
    if len(dataset) < wanted:
        raise ValueError(f"the training split has {split_size(len(dataset), cfg)}, fewer than "
                         f"method.calibration_samples={wanted}: lower method.calibration_samples{more_rows(cfg)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    # Calibration batches of similar lengths: the statistics are sums over tokens, so the order is free, and the
    # forward pass computes on little padding. The held-out batches keep the permutation's order (their mean loss
    # is a mean over batches).
    return sorted(order[:wanted], key=lambda i: len(dataset[i]["input_ids"])), order[wanted:wanted + held_out]


def batches_of(dataset: Dataset, rows: Sequence[int], collate: Callable[[list[Any]], Batch],
               cfg: RunConfig) -> list[Batch]:
    """`rows` of `dataset` in batches of `cfg.trainer.batch_size` examples."""
    size = cfg.trainer.batch_size
    return [collate([dataset[i] for i in rows[start:start + size]]) for start in range(0, len(rows), size)]


def mean_loss(loss: Callable[[nn.Module, Batch], torch.Tensor], model: nn.Module, batches: Sequence[Batch]) -> float:
    """The mean over `batches` of the task loss of each batch, in evaluation mode without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = sum(float(loss(model, {k: v.to(device) for k, v in b.items()})) for b in batches)
    finally:
        model.train(was_training)
    return total / len(batches)


def relative_increase(base: float, truncated: float) -> float:
    return (truncated - base) / abs(base) if base else float("inf") if truncated > base else 0.0


def damage_warning(base: float, truncated: float, targets: Sequence[str], basis: str = "weight") -> str | None:
    """One line when truncating `targets` in `basis` raises the loss by more than DAMAGE_THRESHOLD (relative), else
    None; the remedies offered are those the run has not taken."""
    increase = relative_increase(base, truncated)
    if increase <= DAMAGE_THRESHOLD:
        return None
    remedy = ("set method.truncation_basis=activation" if basis != "activation"
              else "remove fewer components (method.truncation_rank, which defaults to method.rank), or leave those "
              "modules out of model.target_modules")
    return (f"warning: the truncation of {list(targets)} raises the loss on held-out training examples from "
            f"{base:.4f} to {truncated:.4f} (+{increase:.0%}): run kasa-inspect with the same arguments to see which "
            f"modules cause it, or {remedy}")
