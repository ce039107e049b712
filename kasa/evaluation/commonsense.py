"""The LLM-Adapters commonsense-reasoning protocol (Hu et al., 2023), which the paper's Table 3 follows: the model
answers an Alpaca-style prompt, the answer is the first per-task keyword in the generated text, and a missing
keyword counts as wrong.

Matching is case-sensitive and unanchored, exactly as in LLM-Adapters' evaluation, so that scores compare with the
published ones: the training targets are lower case ("the correct answer is answer3"), and a model that answers
"Answer3" or "True" is scored wrong there too. The text given to `extract_answer` must be the generated
continuation only; the prompt itself lists every keyword ("Answer format: answer1/answer2/...").

Prompts follow `task.prompt_style` (kasa.data.prompts.styled_prompt). `clean` is the Stanford Alpaca template, the
same text in training and testing; the generated continuation is the answer text. `llm_adapters` is LLM-Adapters'
own text byte for byte: their scripts build the prompts in indented triple-quoted strings, so every line after the
first starts with 16 spaces, the first line ends in spaces, and the training and evaluation prompts differ slightly
(after stripping each line they equal the clean template). Their evaluation decodes prompt + generation and keeps
`text.split("### Response:")[1]`, what follows the prompt's own marker up to any next one; `llm_adapters_response`
does the same."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Optional

from kasa.data.errors import DataError
from kasa.data.prompts import RESPONSE_MARKER, alpaca_prompt

__all__ = [
    "COMMONSENSE_TASKS", "TASK_LABELS", "accuracy", "alpaca_prompt", "extract_answer", "llm_adapters_response",
    "results_table",
]

COMMONSENSE_TASKS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
)
"""The eight tasks, named as LLM-Adapters' dataset folders, in the column order of the paper's Table 3."""

TASK_LABELS: dict[str, str] = {
    "boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
    "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
}
"""Column headings of the paper's Table 3."""

_CHOICES = re.compile(r"answer1|answer2|answer3|answer4|answer5")
_ANSWER_PATTERNS: dict[str, re.Pattern[str]] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "social_i_qa": _CHOICES,
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
    "ARC-Easy": _CHOICES,
    "ARC-Challenge": _CHOICES,
    "openbookqa": _CHOICES,
}



def _pattern(task: str) -> re.Pattern[str]:
    try:
        return _ANSWER_PATTERNS[task]
    except KeyError:
        valid = ", ".join(COMMONSENSE_TASKS)
        raise ValueError(f"unknown commonsense task '{task}'; valid tasks are {valid}") from None


def check_answers(task: str, answers: Sequence[str], source: str) -> None:
    """Refuse a test row whose answer is none of the task's keywords ("Yes" for boolq): it could never be scored
    correct."""
    pattern = _pattern(task)
    bad = next((i for i, answer in enumerate(answers) if not pattern.fullmatch(answer)), None)
    if bad is not None:
        raise DataError(f"{source}: row {bad} has answer {answers[bad]!r}, which is none of {task}'s answers "
                        f"({pattern.pattern.replace('|', ', ')}): fix that row, or point task.data_dir at "
                        "LLM-Adapters' files")


def extract_answer(task: str, text: str) -> Optional[str]:
    """The first answer keyword of `task` in the generated `text` (e.g. "answer3"), or None when there is none."""
    match = _pattern(task).search(text)
    return match.group(0) if match else None


def llm_adapters_response(prompt: str, generation: str) -> str:
    """The answer text as LLM-Adapters' commonsense evaluation takes it: the decoded prompt + generation split at
    "### Response:", element 1 (what follows the prompt's marker, up to a marker the model may generate itself),
    stripped. `prompt` is the text the model was given and `generation` the decoded continuation; their
    concatenation is what decoding prompt + generation gives."""
    return (prompt + generation).split(RESPONSE_MARKER)[1].strip()


def accuracy(task: str, generations: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction (0..1) of generations whose extracted answer equals the gold answer; no keyword counts as wrong."""
    _pattern(task)
    if len(generations) != len(answers):
        raise ValueError(f"{len(generations)} generations for {len(answers)} answers")
    if not answers:
        raise ValueError("accuracy of no examples is undefined; the test set is empty")
    correct = sum(extract_answer(task, text) == answer for text, answer in zip(generations, answers))
    return correct / len(answers)


def results_table(per_task: Mapping[str, float]) -> str:
    """A one-row markdown table of accuracies (fractions, shown as percentages with one decimal as in Table 3) in
    the paper's column order, and the unweighted mean over the given tasks in an `Average` column (the paper's
    `Avg.`)."""
    if not per_task:
        raise ValueError("results_table needs at least one task's accuracy")
    unknown = [task for task in per_task if task not in _ANSWER_PATTERNS]
    if unknown:
        raise ValueError(
            f"unknown commonsense task(s) {', '.join(unknown)}; valid tasks are {', '.join(COMMONSENSE_TASKS)}"
        )
    out_of_range = [task for task, value in per_task.items() if not 0.0 <= value <= 1.0]
    if out_of_range:
        raise ValueError(
            f"accuracies must be fractions in [0, 1] (as `accuracy` returns); check {', '.join(out_of_range)}"
        )
    tasks = [task for task in COMMONSENSE_TASKS if task in per_task]
    values = [per_task[task] for task in tasks] + [sum(per_task.values()) / len(per_task)]
    header = [TASK_LABELS[task] for task in tasks] + ["Average"]
    return "\n".join([
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
        "| " + " | ".join(f"{100 * value:.1f}" for value in values) + " |",
    ])
