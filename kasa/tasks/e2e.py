"""E2E NLG (paper appendix F.2, table 8): GPT-2 turns a meaning representation (MR) into a restaurant description.

Training pairs are `MR ||` -> ` reference` with the loss on the reference only. Evaluation generates one output per
distinct MR (beam search as in table 8) and scores it against all of that MR's references with the official
metrics; outputs and grouped references are written next to the run."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from kasa.data.errors import DataError
from kasa.data.files import read_e2e_file
from kasa.data.sources import load_hub_split, local_split_file, split_label
from kasa.evaluation.e2e_metrics import (
    JAVA_HINT,
    PYCOCOEVALCAP_HINT,
    e2e_scores,
    group_references,
)
from kasa.tasks.base import examples_fingerprint
from kasa.tasks.causal_lm import CausalLMTask, encode_prompt_response, output_file, training_dataset

if TYPE_CHECKING:
    from datasets import Dataset

# Split -> file names of the official release (CSV) and of the LoRA paper's layout (text).
E2E_SUFFIXES = (".csv", ".txt")  # the official release's CSVs and the LoRA paper's text files
SPLIT_FILES = {
    "train": ("trainset.csv", "train.txt"),
    "validation": ("devset.csv", "valid.txt"),
    "test": ("testset_w_refs.csv", "test.txt"),
}


def check_metric_dependencies() -> None:
    """METEOR, ROUGE-L and CIDEr need pycocoevalcap and a Java runtime: a clear error before any training."""
    if shutil.which("java") is None:
        raise ValueError(JAVA_HINT)
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise ValueError(PYCOCOEVALCAP_HINT)


def e2e_prompt(mr: str) -> str:
    return f"{mr} ||"


def first_line(output: str) -> str:
    """An E2E prediction: the generated text up to its first line boundary of any kind (str.splitlines: a form
    feed or a Unicode line separator too), so that the predictions file holds exactly one line per MR, which the
    official e2e-metrics script reads line by line (a form feed inside one shifted every later output)."""
    lines = output.splitlines()
    return lines[0].strip() if lines else ""


class E2ETask(CausalLMTask):
    def _pairs(self, split: str, limit: int | None) -> tuple[list[str], list[str]]:
        task = self.cfg.task
        candidates = SPLIT_FILES.get(split, (f"{split}.csv", f"{split}.txt"))
        path = local_split_file(task.data_dir, split, candidates, E2E_SUFFIXES)
        if path is not None:
            try:
                mrs, refs = read_e2e_file(path)
            except ValueError as err:
                raise DataError(str(err)) from None
        else:
            rows = load_hub_split(task.hub_id, task.hub_config, split)
            if len(task.text_fields) != 2 or any(f not in rows.column_names for f in task.text_fields):
                raise DataError(f"task.text_fields={task.text_fields} must name the MR and the reference columns of "
                                f"{task.hub_id}; it has {rows.column_names}")
            mr_field, ref_field = task.text_fields
            mrs, refs = [str(m).strip() for m in rows[mr_field]], [str(r).strip() for r in rows[ref_field]]
        if not mrs:
            source = path if path is not None else task.hub_id
            raise DataError(f"E2E split '{split}' ({source}) holds no examples: choose another split or file")
        return (mrs[:limit], refs[:limit]) if limit else (mrs, refs)

    def check_evaluation(self, split: str) -> str:
        check_metric_dependencies()
        return examples_fingerprint(self._evaluated(split))

    def _evaluated(self, split: str) -> tuple[list[str], list[list[str]]]:
        """The MRs and their references (grouped) that an evaluation of `split` scores: max_eval_samples MRs."""
        mrs, references = group_references(*self._pairs(split, None))
        limit = self.cfg.task.max_eval_samples
        return (mrs[:limit], references[:limit]) if limit else (mrs, references)

    def train_dataset(self, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        mrs, refs = self._pairs(self.cfg.task.train_split, self.cfg.task.max_train_samples)
        max_length = self.cfg.trainer.max_length
        return training_dataset([encode_prompt_response(tokenizer, e2e_prompt(mr), f" {ref}", max_length,
                                                        self.cfg.task.train_on_inputs)
                                 for mr, ref in zip(mrs, refs)], max_length, self.cfg.trainer.packing)

    def evaluate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 split: str, output_dir: Path | None = None) -> dict[str, float]:
        mrs, references = self._evaluated(split)
        outputs = self.generate(model, accelerator, tokenizer, [e2e_prompt(mr) for mr in mrs])
        predictions = [first_line(texts[0]) for texts in outputs]
        scores = e2e_scores(predictions, references)
        label = split_label(split)
        if accelerator.is_main_process and (path := output_file(output_dir, f"e2e-{label}-predictions.txt")):
            path.write_text("\n".join(predictions) + "\n")
            # The official e2e-metrics layout: each MR's references, groups separated by a blank line.
            path.with_name(f"e2e-{label}-references.txt").write_text(
                "\n\n".join("\n".join(refs) for refs in references) + "\n")
            path.with_name(f"e2e-{label}-mrs.txt").write_text("\n".join(mrs) + "\n")
        return scores
