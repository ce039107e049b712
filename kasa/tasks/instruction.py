"""Instruction following (paper section 4.3, table 9): supervised fine-tuning on instruction/response pairs (or
chat messages) with the loss on responses only, then an LLM judge scores generated responses 1-10 (figure 7
prompt). Several responses per prompt (generation.num_return_sequences); MT-Bench question files (two turns) are
judged turn by turn. Responses and scores are saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from kasa.data.errors import DataError
from kasa.data.files import load_mt_bench_questions, read_rows
from kasa.data.prompts import (
    conversation_prompt,
    format_instruction_example,
    generation_prompt,
    prompt_text,
    reference_answer,
)
from kasa.data.sources import load_hub_split, local_split_file
from kasa.evaluation.judge import Judge, JudgeConfig, JudgeError, mean_score
from kasa.tasks.causal_lm import CausalLMTask, output_file, training_dataset

T = TypeVar("T")


class InstructionTask(CausalLMTask):
    def check_evaluation(self, split: str) -> None:
        """The split's rows, the judge's endpoint, and its API key in the environment."""
        self._rows(split, 1)
        self._judge()

    def _judge(self) -> Judge:
        settings = self.cfg.task.judge
        if not settings.base_url:
            raise ValueError("instruction following is scored by an LLM judge: set task.judge.base_url=<OpenAI-"
                             f"compatible endpoint> and task.judge.model, and export {settings.api_key_env}")
        config = JudgeConfig(base_url=settings.base_url, model=settings.model, api_key_env=settings.api_key_env,
                             max_retries=settings.max_retries, timeout=settings.timeout)
        try:
            return Judge(config)
        except JudgeError as err:
            raise ValueError(str(err)) from None

    def _rows(self, split: str, limit: int | None) -> list[dict[str, Any]]:
        """Rows of `split`: <data_dir>/<split>.json(l), a JSON / JSON-lines file named by the split itself (e.g. the
        MT-Bench question file next to a Hub training set), or the Hub data set's split."""
        task = self.cfg.task
        path = local_split_file(task.data_dir, split, (f"{split}.json", f"{split}.jsonl"))
        if path is not None:
            rows = read_rows(path)
            if rows and all("turns" in row for row in rows):  # an MT-Bench question file: every question checked now
                rows = load_mt_bench_questions(path)
        else:
            rows = [dict(row) for row in load_hub_split(task.hub_id, task.hub_config, split)]
            if not rows:
                raise DataError(f"split '{split}' of {task.hub_id} holds no examples")
        return rows[:limit] if limit else rows

    def train_dataset(self, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        max_length = self.cfg.trainer.max_length
        rows = self._rows(self.cfg.task.train_split, self.cfg.task.max_train_samples)
        encoded = _each_row(rows, self.cfg.task.train_split,
                            lambda row: format_instruction_example(row, tokenizer, max_length))
        return training_dataset(encoded, max_length, self.cfg.trainer.packing)

    def evaluate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 split: str, output_dir: Path | None = None) -> dict[str, float]:
        rows = self._rows(split, self.cfg.task.max_eval_samples)
        if all("turns" in row for row in rows):
            records = self._mt_bench(model, accelerator, tokenizer, rows)
        else:
            prompts = _each_row(rows, split, lambda row: generation_prompt(row, tokenizer))
            outputs = self._generate(model, accelerator, tokenizer, prompts)
            # The paper grades precision, the response against the instruction (figure 7): the reference answer is
            # saved with the responses but not shown to the judge.
            records = [{"instruction": prompt_text(row), "reference": reference_answer(row), "responses": responses}
                       for row, responses in zip(rows, outputs)]
        # Every process generated a share; only the main one calls the judge, then tells the others the score.
        metrics = [None]
        if accelerator.is_main_process:
            path = output_file(output_dir, f"instruction-{split}.jsonl")
            if path is not None:  # the responses are kept even if judging fails
                path.write_text("".join(json.dumps(record) + "\n" for record in records))
            judge = self._judge()
            try:
                for record in records:
                    if "turns" in record:
                        record["scores"] = judge.judge_mt_bench_answer(record, record["responses"])
                    else:
                        record["scores"] = judge.score_many({"instruction": record["instruction"], "response": r}
                                                            for r in record["responses"])
            except JudgeError as err:
                saved = f" (the responses are in {path})" if path is not None else ""
                raise ValueError(f"judging failed{saved}: {err}") from None
            if path is not None:
                path.write_text("".join(json.dumps(record) + "\n" for record in records))
            metrics = [{"judge_score": mean_score([s for record in records for s in record["scores"]])}]
        return broadcast_object_list(metrics)[0] if accelerator.num_processes > 1 else metrics[0]

    def _generate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                  prompts: list[tuple[str, bool]]) -> list[list[str]]:
        # Chat-template prompts carry their own special tokens; Alpaca prompts get the tokenizer's.
        add_special = prompts[0][1] if prompts else True
        return self.generate(model, accelerator, tokenizer, [text for text, _ in prompts], add_special)

    def _mt_bench(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                  rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """MT-Bench: the model answers each question's turns in order, every later turn prompted with the
        conversation so far (its own earlier answers included); one answer per turn."""
        conversations: list[list[dict[str, str]]] = [[] for _ in rows]
        answers: list[list[str]] = [[] for _ in rows]
        for k in range(max(len(row["turns"]) for row in rows)):
            active = [i for i, row in enumerate(rows) if k < len(row["turns"])]
            for i in active:
                conversations[i].append({"role": "user", "content": rows[i]["turns"][k]})
            outputs = self._generate(model, accelerator, tokenizer,
                                     [conversation_prompt(conversations[i], tokenizer) for i in active])
            for i, texts in zip(active, outputs):
                conversations[i].append({"role": "assistant", "content": texts[0]})
                answers[i].append(texts[0])
        return [{"question_id": row.get("question_id"), "category": row.get("category"), "turns": row["turns"],
                 "reference": row.get("reference"), "responses": row_answers}
                for row, row_answers in zip(rows, answers)]


def _each_row(rows: list[dict[str, Any]], split: str, function: Callable[[dict[str, Any]], T]) -> list[T]:
    """`function` of every row; a row it refuses is named by its index (counted from 0) in the split."""
    results = []
    for index, row in enumerate(rows):
        try:
            results.append(function(row))
        except ValueError as err:
            raise DataError(f"split '{split}', row {index}: {err}") from None
    return results
