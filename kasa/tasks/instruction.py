"""Instruction following (paper section 4.3, table 9): supervised fine-tuning on instruction/response pairs (or
chat messages) with the loss on responses only, then an LLM judge scores generated responses 1-10 (figure 7
prompt). Several responses per prompt (generation.num_return_sequences); MT-Bench question files (two turns) are
judged turn by turn. Responses and scores are saved."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers import PreTrainedTokenizerBase

from kasa.config import launch_rank
from kasa.data.errors import DataError
from kasa.data.files import load_mt_bench_questions, read_rows
from kasa.data.prompts import (
    conversation_prompt,
    format_instruction_example,
    generation_prompt,
    prompt_text,
    reference_answer,
)
from kasa.data.sources import load_hub_split, local_split_file, split_label
from kasa.evaluation.judge import Judge, JudgeConfig, JudgeError, mean_score
from kasa.run_dir import write_atomically
from kasa.tasks.base import EvaluationFailed, examples_fingerprint
from kasa.tasks.causal_lm import CausalLMTask, output_file, training_dataset
from kasa.tasks.models import inner_model

if TYPE_CHECKING:
    from datasets import Dataset


T = TypeVar("T")
# Fields of a saved record (besides its question, responses and scores): what generated the responses
# (InstructionTask._fingerprint) and which judge gave the scores; a later evaluation reuses what matches.
GENERATED_BY, JUDGED_BY = "generated_by", "judged_by"


class InstructionTask(CausalLMTask):
    def check_evaluation(self, split: str) -> str:
        """The split's rows, the judge's endpoint, and its API key in the environment; a judge that does not answer
        now is a warning, not an error (on one 24 GB GPU it often runs only after the training)."""
        rows = self._rows(split, self.cfg.task.max_eval_samples)
        mt_bench = all("turns" in row for row in rows)
        _each_row(rows, self._where(split), lambda row: _question(row, mt_bench))  # before the training, not after
        judge = self._judge()
        if launch_rank()[0] == 0 and (problem := judge.unanswered()) is not None:
            print(f"warning: the judge at {judge.config.base_url} does not answer now ({problem}): start it before the "
                  "evaluation; if it is still down then, the responses are kept, and resume=auto (or kasa-eval) "
                  "judges them later", file=sys.stderr, flush=True)
        return examples_fingerprint(rows)

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

    def _where(self, split: str) -> str:
        """`split` and the file or Hub data set it is read from, for a message about one of its rows."""
        path = self._split_file(split)
        return f"split '{split}' ({path})" if path is not None else f"split '{split}' of {self.cfg.task.hub_id}"

    def _split_file(self, split: str) -> Path | None:
        return local_split_file(self.cfg.task.data_dir, split, (f"{split}.json", f"{split}.jsonl"), (".json", ".jsonl"))

    def _rows(self, split: str, limit: int | None) -> list[dict[str, Any]]:
        """Rows of `split`: <data_dir>/<split>.json(l), a JSON / JSON-lines file named by the split itself (e.g. the
        MT-Bench question file next to a Hub training set), or the Hub data set's split."""
        task = self.cfg.task
        path = self._split_file(split)
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
        encoded = _each_row(rows, self._where(self.cfg.task.train_split),
                            lambda row: format_instruction_example(row, tokenizer, max_length,
                                                                   self.cfg.task.train_on_inputs))
        return training_dataset(encoded, max_length, self.cfg.trainer.packing)

    def evaluate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 split: str, output_dir: Path | None = None) -> dict[str, float]:
        """The judge's mean score of the responses to `split`. The responses, then each record's scores as they
        come, are saved in <output_dir>/instruction-<split label>.jsonl (data.sources.split_label); an evaluation
        that finds there the responses of the same model, prompts and decoding settings (a resume after judging
        failed, kasa-eval run again) reuses them, and the scores that the same judge gave, instead of generating and
        judging again."""
        rows = self._rows(split, self.cfg.task.max_eval_samples)
        mt_bench = all("turns" in row for row in rows)
        where = self._where(split)
        questions = _each_row(rows, where, lambda row: _question(row, mt_bench))
        first_prompts = _each_row(rows, where, lambda row: conversation_prompt(
            [{"role": "user", "content": row["turns"][0]}], tokenizer) if mt_bench else generation_prompt(row, tokenizer))
        fingerprint = self._fingerprint(model, accelerator, tokenizer, first_prompts)
        name = f"instruction-{split_label(split)}.jsonl"
        path = output_file(output_dir, name) if accelerator.is_main_process else None
        records = [_saved_records(path, questions, fingerprint)]
        if accelerator.num_processes > 1:  # generation is shared out: every process must take the same way
            records = broadcast_object_list(records)
        if records[0] is None:
            if mt_bench:
                responses = self._mt_bench(model, accelerator, tokenizer, rows)
            else:
                responses = self._generate(model, accelerator, tokenizer, first_prompts)
            records[0] = [{**question, "responses": answers, GENERATED_BY: fingerprint}
                          for question, answers in zip(questions, responses)]
        elif path is not None:
            print(f"reusing the responses in {path} (the same model, prompts and decoding settings)", flush=True)
        # Every process generated a share; only the main one calls the judge, then tells the others the score, or
        # that judging failed: then every process raises the same error, none is left waiting for the score.
        outcome: list[dict[str, Any] | None] = [None]
        if accelerator.is_main_process:
            try:
                outcome = [{"metrics": {"judge_score": self._judge_all(records[0], path)}}]
            except ValueError as err:
                outcome = [{"error": str(err)}]
        if accelerator.num_processes > 1:
            outcome = broadcast_object_list(outcome)
        if "error" in outcome[0]:
            raise EvaluationFailed(outcome[0]["error"])
        return outcome[0]["metrics"]

    def _judge_all(self, records: list[dict[str, Any]], path: Path | None) -> float:
        """Scores every record that holds no scores of this judge yet, `task.judge.concurrency` records at a time, and
        returns the mean score. The records are saved before, and again as each one is scored: a failure, or a kill,
        keeps the responses and what was scored. After a failure no new record is sent; those in flight finish.
        The paper grades precision, the response against the instruction (figure 7): a reference answer is saved
        with the responses, and shown to the judge for MT-Bench questions only."""
        judge = self._judge()
        judged_by = f"{judge.config.model} at {judge.config.base_url}"

        failed = threading.Event()  # set by the worker whose row failed, before it can take the next queued row

        def score(record: dict[str, Any]) -> list[int] | None:
            if failed.is_set():  # a row failed while this one waited in the queue: not sent (None)
                return None
            try:
                if "turns" in record:
                    return judge.judge_mt_bench_answer(record, record["responses"])
                return judge.score_many({"instruction": record["instruction"], "response": r}
                                        for r in record["responses"])
            except JudgeError:
                failed.set()
                raise

        _save_records(path, records)
        pool = ThreadPoolExecutor(max_workers=self.cfg.task.judge.concurrency)
        futures = {pool.submit(score, record): index for index, record in enumerate(records)
                   if not (record.get(JUDGED_BY) == judged_by and "scores" in record)}
        failures: list[tuple[int, JudgeError]] = []
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                index = futures[future]
                try:
                    scores = future.result()
                    if scores is None:  # not sent: a row failed first
                        continue
                    records[index] |= {"scores": scores, JUDGED_BY: judged_by}
                except JudgeError as err:
                    failures.append((index, err))
                    for other in futures:
                        other.cancel()
                    continue
                _save_records(path, records)
        finally:
            pool.shutdown(cancel_futures=True)
        if failures:
            index, err = min(failures, key=lambda failure: failure[0])
            saved = f" (the responses are in {path})" if path is not None else ""
            raise ValueError(f"judging failed{saved}: row {index}: {err}")
        return mean_score([s for record in records for s in record["scores"]])

    def _fingerprint(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                     prompts: list[tuple[str, bool]]) -> str:
        """What saved responses must have been generated by to be reused: these prompts, these decoding settings
        and this model, known by its logits on the first prompt (bit for bit the same only for the same weights,
        adapter and base; a resumed run restores them exactly; its first 32 tokens are enough). Every process
        runs the forward pass: sharded weights are gathered for it."""
        digest = hashlib.sha256(json.dumps([dataclasses.asdict(self.cfg.task.generation), prompts]).encode())
        if prompts:
            inner = inner_model(accelerator, model)
            text, add_special = prompts[0]
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special)["input_ids"][:, :32]
            was_training = inner.training
            inner.eval()
            try:
                with torch.no_grad():
                    digest.update(inner(input_ids=ids.to(inner.device)).logits.float().cpu().numpy().tobytes())
            finally:
                inner.train(was_training)
        return digest.hexdigest()

    def _generate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                  prompts: list[tuple[str, bool]]) -> list[list[str]]:
        # Chat-template prompts carry their own special tokens; Alpaca prompts get the tokenizer's.
        add_special = prompts[0][1] if prompts else True
        return self.generate(model, accelerator, tokenizer, [text for text, _ in prompts], add_special)

    def _mt_bench(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                  rows: list[dict[str, Any]]) -> list[list[str]]:
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
        return answers


def _question(row: dict[str, Any], mt_bench: bool) -> dict[str, Any]:
    """What a saved record holds of its row: an MT-Bench question's id, category, turns and reference answers, or
    the instruction a judge is shown and the reference answer."""
    if mt_bench:
        return {key: row.get(key) for key in ("question_id", "category", "turns", "reference")}
    return {"instruction": prompt_text(row), "reference": reference_answer(row)}


def _saved_records(path: Path | None, questions: list[dict[str, Any]], fingerprint: str) -> list[dict] | None:
    """The records saved at `path` when they answer exactly `questions` and were generated under `fingerprint`
    (InstructionTask._fingerprint); else None."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines()] if path is not None else None
    except (OSError, ValueError):  # none yet, or not ours
        return None
    if records is None or len(records) != len(questions):
        return None
    for record, question in zip(records, questions):
        if not isinstance(record, dict) or record.get(GENERATED_BY) != fingerprint or any(
                record.get(key) != value for key, value in question.items()):
            return None
    return records


def _save_records(path: Path | None, records: list[dict[str, Any]]) -> None:
    if path is not None:
        text = "".join(json.dumps(record) + "\n" for record in records)
        write_atomically(path, lambda tmp: tmp.write_text(text))


def _each_row(rows: list[dict[str, Any]], where: str, function: Callable[[dict[str, Any]], T]) -> list[T]:
    """`function` of every row; a row it refuses is named by its index (counted from 0) in `where` (InstructionTask.
    _where: the split and its file)."""
    results = []
    for index, row in enumerate(rows):
        try:
            results.append(function(row))
        except ValueError as err:
            raise DataError(f"{where}, row {index}: {err}") from None
    return results
