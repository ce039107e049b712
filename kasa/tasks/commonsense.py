"""Commonsense reasoning with the LLM-Adapters protocol (paper section 4.4, table 3): train on Commonsense170K
(Alpaca-style prompt -> answer sentence), evaluate by generating on each test set and matching the task's answer
pattern; per-task accuracy and their average. Per-example outputs are saved. `task.prompt_style` picks the prompts:
`clean` (the Stanford Alpaca template) or `llm_adapters` (LLM-Adapters' exact bytes, training and evaluation each as
its scripts have them, and its way of cutting the answer out of the decoded text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from kasa.data.errors import DataError
from kasa.data.files import load_commonsense_file
from kasa.data.prompts import styled_prompt
from kasa.data.sources import load_hub_split, local_split_file, split_label
from kasa.evaluation.commonsense import (
    COMMONSENSE_TASKS,
    accuracy,
    check_answers,
    extract_answer,
    llm_adapters_response,
    results_table,
)
from kasa.tasks.base import examples_fingerprint
from kasa.tasks.causal_lm import CausalLMTask, encode_prompt_response, output_file, training_dataset

if TYPE_CHECKING:
    from datasets import Dataset


class CommonsenseTask(CausalLMTask):
    def _train_rows(self) -> list[dict]:
        """Commonsense170K (or any LLM-Adapters-layout file): <data_dir>/<train_split>.json, a file path given as
        train_split, or, when data_dir holds no such file and task.hub_id is set, that Hub data set's split."""
        task = self.cfg.task
        path = None
        if task.data_dir is not None:
            try:
                path = local_split_file(task.data_dir, task.train_split, (f"{task.train_split}.json",))
            except DataError:
                if not task.hub_id:
                    raise
        else:
            path = local_split_file(None, task.train_split, ())
        if path is not None:
            rows = load_commonsense_file(path)
        else:
            rows = [dict(row) for row in load_hub_split(task.hub_id, task.hub_config, task.train_split)]
            missing = [f for f in ("instruction", "output") if rows and f not in rows[0]]
            if missing:
                raise DataError(f"{task.hub_id} split {task.train_split} has no {', '.join(missing)} column: "
                                "commonsense training rows need instruction, input, output")
        return rows[: task.max_train_samples] if task.max_train_samples else rows

    def _eval_rows(self, name: str, split: str) -> list[dict]:
        if self.cfg.task.data_dir is None:
            raise DataError("commonsense evaluation reads the LLM-Adapters test files: set task.data_dir=<folder "
                            "holding boolq/test.json, piqa/test.json, ...>")
        data_dir = Path(self.cfg.task.data_dir)
        if not data_dir.is_dir():
            raise DataError(f"task.data_dir={self.cfg.task.data_dir} is not a folder: point it at the folder holding "
                            "boolq/test.json, piqa/test.json, ...")
        path = data_dir / name / f"{split}.json"
        if not path.is_file():
            raise DataError(f"{path} does not exist: the evaluated split is {split!r} (task.eval_split, kasa-eval's "
                            f"split=), read from <task.data_dir>/<set>/{split}.json for each of task.eval_sets")
        rows = load_commonsense_file(path)
        limit = self.cfg.task.max_eval_samples
        rows = rows[:limit] if limit else rows
        check_answers(name, [row["answer"] for row in rows], str(path))
        return rows

    def check_evaluation(self, split: str) -> str:
        """Every set of task.eval_sets has its `split` file (exact-match answers need no tool)."""
        unknown = [s for s in self.cfg.task.eval_sets if s not in COMMONSENSE_TASKS]
        if unknown or not self.cfg.task.eval_sets:
            raise DataError(f"task.eval_sets={self.cfg.task.eval_sets}: choose from {', '.join(COMMONSENSE_TASKS)}")
        return examples_fingerprint({name: self._eval_rows(name, split) for name in self.cfg.task.eval_sets})

    def train_dataset(self, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        max_length = self.cfg.trainer.max_length
        style = self.cfg.task.prompt_style
        return training_dataset([encode_prompt_response(tokenizer,
                                                        styled_prompt(style, r["instruction"], r.get("input"),
                                                                      training=True),
                                                        r["output"], max_length, self.cfg.task.train_on_inputs)
                                 for r in self._train_rows()],
                                max_length, self.cfg.trainer.packing)

    def evaluate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 split: str, output_dir: Path | None = None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        style = self.cfg.task.prompt_style
        for name in self.cfg.task.eval_sets:
            rows = self._eval_rows(name, split)
            prompts = [styled_prompt(style, r["instruction"], r.get("input"), training=False) for r in rows]
            generations = [texts[0] for texts in self.generate(model, accelerator, tokenizer, prompts)]
            if style == "llm_adapters":
                generations = [llm_adapters_response(p, g) for p, g in zip(prompts, generations)]
            predicted = [extract_answer(name, text) for text in generations]
            metrics[name] = accuracy(name, generations, [r["answer"] for r in rows])
            outputs = f"commonsense-{name}-{split_label(split)}.jsonl"
            if accelerator.is_main_process and (path := output_file(output_dir, outputs)):
                with path.open("w") as f:
                    for row, text, answer in zip(rows, generations, predicted):
                        f.write(json.dumps({"instruction": row["instruction"], "generation": text,
                                            "predicted": answer, "answer": row["answer"],
                                            "correct": answer == row["answer"]}) + "\n")
        metrics["average"] = sum(metrics.values()) / len(metrics)
        table = f"commonsense-{split_label(split)}-table.md"
        if accelerator.is_main_process and (path := output_file(output_dir, table)):
            path.write_text(results_table({k: v for k, v in metrics.items() if k != "average"}) + "\n")
        return metrics
