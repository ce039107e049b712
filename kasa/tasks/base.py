"""The interface between a task and the training loop / kasa-eval."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase


def examples_fingerprint(examples: Any) -> str:
    """sha256 of evaluated examples (rows of JSON values): the same data gives the same text, wherever it lies."""
    text = json.dumps(examples, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class EvaluationFailed(ValueError):
    """An evaluation that failed on every process alike, at the same point and outside any collective operation (a
    judge that the main process asks alone, then tells the others about): the processes can still save together, and
    the main one alone reports it (kasa.cli.common.fail)."""

    every_rank_alike = True


class Task(Protocol):
    metric: str  # the metric that picks the best epoch (higher is better)

    def check_evaluation(self, split: str) -> str:
        """Fail now, with one line, if the evaluation of `split` cannot run here: its data is missing or malformed,
        or a tool or a credential it needs is. kasa-train and kasa-eval call it before the model loads; kasa-export
        and kasa-inspect, which never evaluate, do not. Returns the `examples_fingerprint` of the examples the
        evaluation reads (after task.max_eval_samples): kasa-eval tells the training run's data from other data."""

    def load_model(self) -> tuple[PreTrainedTokenizerBase, nn.Module]:
        """Tokenizer and base model (before adapters)."""

    def train_dataset(self, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        """The encoded training split."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        """Batches encoded training rows."""

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs for one batch of `collator`'s (on the model's device): what `loss` and the
        calibration passes of the activation basis give the model."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss (L1) of one batch: a mean over its `loss_items`."""

    def loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms the batch's loss is the mean of (examples, or labelled tokens), known without a
        host-device sync: the training step weighs micro-batches by it."""

    def evaluate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 split: str, output_dir: Path | None = None) -> dict[str, float]:
        """Metrics on `split`; every process takes part. Generation tasks write their outputs into output_dir."""
