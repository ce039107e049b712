"""GLUE-style sentence(-pair) classification and regression (paper section 4.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from kasa.config import RunConfig
from kasa import data as task_data  # its GLUE readers load on first use (they import datasets)
from kasa.evaluation.metrics import compute_metrics
from kasa.tasks.base import examples_fingerprint
from kasa.tasks.models import load_classifier, load_tokenizer


class GlueTask:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.metric = cfg.task.metric
        # read and encoded once, keyed by (split, evaluated): a second read would repeat its warnings, and a split is
        # cut to max_eval_samples when evaluated, to max_train_samples when it is the training split
        self._raw: dict[tuple[str, bool], Dataset] = {}
        self._encoded: dict[tuple[str, bool], Dataset] = {}

    def check_evaluation(self, split: str) -> str:
        """The split's data, with labels (the metrics need scikit-learn and scipy, installed with kasa)."""
        return examples_fingerprint(self._read(split, evaluated=True).to_list())

    def _read(self, split: str, evaluated: bool) -> Dataset:
        if (split, evaluated) not in self._raw:
            self._raw[split, evaluated] = task_data.load_glue_splits(self.cfg.task, [split], evaluated)[split]
        return self._raw[split, evaluated]

    def load_model(self) -> tuple[PreTrainedTokenizerBase, nn.Module]:
        tokenizer = load_tokenizer(self.cfg.model)
        model = load_classifier(self.cfg.model, self.cfg.task)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return tokenizer, model

    def _split(self, tokenizer: PreTrainedTokenizerBase, split: str, evaluated: bool) -> Dataset:
        if (split, evaluated) not in self._encoded:
            from datasets import DatasetDict  # loaded by now: _read imported it

            raw = DatasetDict({split: self._read(split, evaluated)})
            encoded = task_data.encode_glue(raw, tokenizer, self.cfg.task, self.cfg.trainer.max_length)
            self._encoded[split, evaluated] = encoded[split]
        return self._encoded[split, evaluated]

    def train_dataset(self, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        self._split(tokenizer, self.cfg.task.eval_split, evaluated=True)  # its problems now, not after an epoch
        return self._split(tokenizer, self.cfg.task.train_split, evaluated=False)

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return DataCollatorWithPadding(tokenizer)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        logits = model(**self.model_inputs(batch)).logits
        if self.cfg.task.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.trainer.label_smoothing)

    def loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 split: str, output_dir: Path | None = None) -> dict[str, float]:
        """The split's metrics, the same for the training loop's evaluations and kasa-eval's (both call this)."""
        loader = accelerator.prepare(DataLoader(self._split(tokenizer, split, evaluated=True),
                                                batch_size=self.cfg.trainer.eval_batch_size,
                                                collate_fn=self.collator(tokenizer)))
        was_training = model.training
        model.eval()
        predictions, labels = [], []
        for batch in loader:
            logits = model(**self.model_inputs(batch)).logits
            logits, batch_labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
            predictions.append(logits.cpu().numpy())
            labels.append(batch_labels.cpu().numpy())
        model.train(was_training)
        return compute_metrics(np.concatenate(predictions), np.concatenate(labels), self.cfg.task.num_labels)
