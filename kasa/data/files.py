"""Readers of the task files that are not GLUE tables (those are in kasa.data.glue): the JSON and JSON-lines files of
the instruction, commonsense and MT-Bench tasks, and the E2E files (both layouts). Each checks its file's shape at once and raises a DataError that
names the file (and row) and the fix, before any training or paid judging starts."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from kasa.data.errors import DataError, read_text

_COMMONSENSE_FIELDS = ("instruction", "output", "answer")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON list file or a JSON-lines file (either suffix)."""
    text = read_text(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # a JSON list: where it breaks (its end, for a truncated file)
            raise DataError(f"{path} is not a valid JSON list ({err})") from None
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as line_err:
                raise DataError(f"{path}: line {number} is not JSON ({line_err.msg}, column {line_err.colno}); the "
                                "file is read as JSON lines, one object per line, or one JSON list") from None
    if isinstance(rows, dict):
        wrapped = [key for key, value in rows.items() if isinstance(value, list) and value
                   and all(isinstance(item, dict) for item in value)]
        if wrapped:  # {"data": [...]}: read as one example, it only failed later for lacking every field
            raise DataError(f"{path} holds a JSON object whose {wrapped[0]!r} holds the examples: write the list "
                            "itself, or one example object per line (JSON lines)")
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path} holds no examples")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: example {bad} is not a JSON object")
    return rows


def load_commonsense_file(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The rows of an LLM-Adapters JSON file (a list of objects with string `instruction`, `output`, `answer` and an
    optional `input`, filled in as "" when absent) so every row can go straight into a prompt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; point to an LLM-Adapters file such as dataset/boolq/test.json")
    text = read_text(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        lines = "; it looks like JSON lines, one object per line: write one JSON list" if (
            text.lstrip().startswith("{") and "Extra data" in str(err)) else ""
        empty = "; the file is empty" if not text.strip() else ""
        raise DataError(f"{path} is not valid JSON ({err}){lines}{empty}: an LLM-Adapters file is one JSON list of "
                        "objects") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path} must hold a non-empty JSON list of objects, one per example")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{path}: row {i} is a {type(row).__name__}, not an object")
        missing = [field for field in _COMMONSENSE_FIELDS if not isinstance(row.get(field), str)]
        if missing:
            raise DataError(
                f"{path}: row {i} lacks string field(s) {', '.join(missing)}; an LLM-Adapters row has "
                "instruction, input, output and answer"
            )
        if not isinstance(row.get("input", ""), str):
            raise DataError(f"{path}: row {i} has a non-string 'input'")
    return [{**row, "input": row.get("input", "")} for row in rows]


def load_mt_bench_questions(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The questions of an MT-Bench question.jsonl file (one JSON object a line with an int `question_id`, a
    `category` and a list of string `turns`, plus an optional `reference` list), checked so that a malformed line
    fails here, naming its line, rather than midway through a paid judging run."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; point to MT-Bench's question.jsonl")
    questions = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            question = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not valid JSON ({err})") from None
        if not isinstance(question, dict):
            raise DataError(f"{where} is not a JSON object")
        turns = question.get("turns")
        if not isinstance(question.get("question_id"), int) or not isinstance(question.get("category"), str):
            raise DataError(f"{where} needs an integer 'question_id' and a string 'category'")
        if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
            raise DataError(f"{where} needs 'turns', a non-empty list of strings")
        reference = question.get("reference")
        if reference is not None and not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
            raise DataError(f"{where} has a 'reference' that is not a list of strings")
        questions.append(question)
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions


def read_e2e_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(MRs, references), one pair per row, from either E2E layout:

    - the official release CSV: a `mr,ref` header, then quoted `"MR","reference"` rows;
    - the LoRA paper's text layout: `name : X | area : Y||reference`, one pair per line (tokenised text).

    Surrounding whitespace of each field is stripped, as the official script does. Anything else (for instance
    the MR-only test set) is a ValueError, so a wrong file fails loudly instead of being scored."""
    path = Path(path)
    text = read_text(path)
    first_line = text.split("\n", 1)[0].strip()
    if not text.strip():
        raise ValueError(f"{path} is empty: an E2E split needs a 'mr,ref' header and rows, or 'MR||reference' lines")
    if re.fullmatch(r'"?mr"?\s*,\s*"?ref"?', first_line, flags=re.IGNORECASE):
        return _read_csv_layout(path, text)
    if "||" in first_line:
        return _read_lora_layout(path, text)
    if re.fullmatch(r'"?mr"?', first_line, flags=re.IGNORECASE):  # the official release's test MRs
        raise ValueError(f"{path} holds meaning representations without references (an 'MR' column only): it can be "
                         "neither trained on nor scored; use a file with references (the official testset_w_refs.csv "
                         "to evaluate)")
    raise ValueError(
        f"{path}: unknown E2E layout (first line {first_line[:80]!r}); expected the official CSV with a 'mr,ref' "
        "header or the LoRA layout 'name : X | area : Y||reference' per line"
    )


def _read_csv_layout(path: Path, text: str) -> tuple[list[str], list[str]]:
    mrs, refs = [], []
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)  # the mr,ref header
    for row in reader:
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}, line {reader.line_num}: expected 2 fields (mr, ref), got {len(row)}")
        _append_pair(mrs, refs, row[0], row[1], f"{path}, line {reader.line_num}")
    return mrs, refs


def _read_lora_layout(path: Path, text: str) -> tuple[list[str], list[str]]:
    mrs, refs = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise ValueError(f"{path}, line {line_number}: no '||' between the MR and the reference")
        _append_pair(mrs, refs, *line.split("||", 1), f"{path}, line {line_number}")
    return mrs, refs


def _append_pair(mrs: list[str], refs: list[str], mr: str, ref: str, where: str) -> None:
    """One (MR, reference) pair, stripped; an empty side would train towards an empty text or score against one."""
    mr, ref = mr.strip(), ref.strip()
    for name, value in (("meaning representation", mr), ("reference", ref)):
        if not value:
            raise ValueError(f"{where}: the {name} is empty; fill or remove that row")
    mrs.append(mr)
    refs.append(ref)
