"""GLUE-style task data: load a train and an eval split (from the Hub, or from the GLUE release's TSV files when the
Hub is out of reach), normalise them to `text_fields + ["label"]`, and tokenize them for the collator.

Both sources end in the same checks (columns, labels, emptiness), so a config that works with local files works
with the Hub and fails the same way when it is wrong, with a one-line `DataError` that says what to change."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

from kasa.config import TaskConfig
from kasa.data.errors import DataError, not_text
from kasa.data.sources import find_split_file, load_hub_splits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SUBSAMPLE_SEED = 0
"""Seed of the shuffle before taking the first `max_*_samples` rows: fixed so that a subsample is the same in every
run and every method compared on it."""

# Split name -> file stems tried in this order (the GLUE release's names). A split name is also tried as a stem
# itself, so eval_split=in_domain_dev reads in_domain_dev.tsv.
_SPLIT_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("dev", "dev_matched"),  # MNLI has no dev.tsv
    "validation_matched": ("dev_matched",),
    "validation_mismatched": ("dev_mismatched",),
    "test": ("test",),
}
_DELIMITERS = {".tsv": "\t", ".csv": ","}

# String labels -> ids in the order of the Hub's GLUE ClassLabel names (nyu-mll/glue), so that a model trained on
# local files and one trained on the Hub data agree on what class 0 means. Keyed by task.num_labels.
_LABEL_NAMES: dict[int, dict[str, int]] = {
    2: {"entailment": 0, "not_entailment": 1},  # RTE, QNLI, (WNLI uses ints)
    3: {"entailment": 0, "neutral": 1, "contradiction": 2},  # MNLI
}
_UNLABELED = frozenset({"", "-1", "-1.0"})  # GLUE test files and the Hub's test splits mark labels so
# ...but -1 is also a score: a regression split's -1 means "no label" only where every row has it (a test split)
_NO_SCORE = frozenset({""})

# The GLUE release's TSVs name some columns differently from the Hub's GLUE data set: a file column is read under
# the Hub's name when the file lacks that name, so one task config serves both sources.
_FILE_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "label": ("score", "Quality", "is_duplicate", "gold_label"),  # STS-B, MRPC, QQP, MNLI
    "sentence1": ("#1 String",),  # MRPC
    "sentence2": ("#2 String",),
    "premise": ("sentence1",),  # MNLI
    "hypothesis": ("sentence2",),
}

# The GLUE release's CoLA files have no header: source, label, original mark, sentence.
_COLA_COLUMNS = ("source", "label", "mark", "sentence")


def load_glue_splits(task: TaskConfig, splits: Optional[Sequence[str]] = None, evaluated: bool = False) -> DatasetDict:
    """The task's train and eval splits as a DatasetDict keyed by `task.train_split` and `task.eval_split`, with
    columns `task.text_fields + ["label"]` (int64 class ids, or float32 scores when `task.num_labels == 1`).

    Reads local GLUE files when `task.data_dir` is set and the Hub (`task.hub_id`, `task.hub_config`) otherwise.
    Unlabeled rows (label missing or -1) are dropped; a split with no labels at all is an error. When
    `task.max_train_samples` / `task.max_eval_samples` are set, each split is cut to its first N rows after a
    shuffle with `SUBSAMPLE_SEED`, so quick runs see a representative and reproducible sample.

    `splits` loads other splits instead (kasa-eval: only the one it evaluates); `task.train_split` is cut to
    max_train_samples and every other split to max_eval_samples, so evaluating a test split costs what the eval
    split does; with `evaluated`, every split is cut to max_eval_samples (kasa-eval of the training split)."""
    if splits is None:
        if task.train_split == task.eval_split:
            raise DataError(
                f"task.train_split and task.eval_split are both '{task.train_split}': evaluating on the training "
                "data says nothing about generalisation; choose two different splits"
            )
        splits = [task.train_split, task.eval_split]
    splits = list(dict.fromkeys(splits))
    raw = _load_local(task, splits) if task.data_dir is not None else _load_hub(task, splits)
    limits = {name: task.max_train_samples if name == task.train_split and not evaluated else task.max_eval_samples
              for name in splits}
    return DatasetDict({name: _subsample(raw[name], limits[name], name) for name in splits})


def encode_glue(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, task: TaskConfig, max_length: int
) -> DatasetDict:
    """Tokenize every split to `input_ids`, `attention_mask` (and `token_type_ids` when the tokenizer makes them)
    and `labels`, dropping the text columns. Sequences are truncated to `max_length` but not padded: the collator
    pads each batch to its own longest row, which is much cheaper than padding everything to `max_length`.
    Labels stay int64 for classification and float32 for regression, the dtypes the models' losses expect."""
    fields = list(task.text_fields)
    if not 1 <= len(fields) <= 2:
        raise DataError(f"task.text_fields={fields}: a GLUE task has one text field or a pair, not {len(fields)}")
    label_dtype = np.float32 if task.num_labels == 1 else np.int64

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = dict(tokenizer(*(batch[field] for field in fields), truncation=True, max_length=max_length))
        encoded["labels"] = np.asarray(batch["label"], dtype=label_dtype)
        return encoded

    return splits.map(tokenize, batched=True, remove_columns=[*fields, "label"])


def _load_hub(task: TaskConfig, splits: Sequence[str]) -> dict[str, Dataset]:
    """The splits from the Hub (`task.hub_id`, `task.hub_config`), normalised to GLUE's columns."""
    if not task.hub_id:
        raise DataError(
            f"task '{task.name}' sets neither task.hub_id nor task.data_dir; set task.data_dir=<folder with "
            "train.tsv/dev.tsv> (local GLUE files) or task.hub_id=<datasets Hub id>"
        )
    hub = task.hub_id if task.hub_config is None else f"{task.hub_id}/{task.hub_config}"
    loaded = load_hub_splits(task.hub_id, task.hub_config, splits, local_files="train.tsv/dev.tsv")
    return {split: _normalise(loaded[split], task, split, f"Hub '{hub}'") for split in splits}


def _load_local(task: TaskConfig, splits: Sequence[str]) -> dict[str, Dataset]:
    """The splits from GLUE files in `task.data_dir`."""
    data_dir = Path(task.data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(
            f"task.data_dir='{task.data_dir}' is not a folder (resolved to {data_dir.resolve()}); point it at a "
            "folder holding train.tsv and dev.tsv"
        )
    wanted = list(dict.fromkeys([*task.text_fields, task.label_field]))
    result = {}
    for split in splits:
        path = _split_file(data_dir, split)
        columns, rows = _read_rows(path, task)
        _check_columns(columns, task, split, str(path))
        index = {name: columns.index(name) for name in wanted}
        table = {name: [row[index[name]] for _, row in rows] for name in wanted}
        lines = [f"line {line}" for line, _ in rows]
        result[split] = _normalise(Dataset.from_dict(table), task, split, str(path), lines)
    return result


def _split_file(data_dir: Path, split: str) -> Path:
    """The file holding `split`: its GLUE name (train.tsv, dev.tsv, dev_matched.tsv, test.tsv) or `<split>.tsv`,
    with .csv accepted in place of .tsv (kasa.data.sources.find_split_file)."""
    stems = dict.fromkeys((*_SPLIT_STEMS.get(split, ()), split))
    path = find_split_file(data_dir, split, [f"{stem}{suffix}" for stem in stems for suffix in _DELIMITERS],
                           suffixes=tuple(_DELIMITERS))
    if path.suffix not in _DELIMITERS:
        raise DataError(f"{path} is not a GLUE table: give a .tsv or .csv file")
    return path


def _with_hub_names(header: list[str], wanted: list[str]) -> list[str]:
    renamed = list(header)
    for name in wanted:
        if name not in renamed:
            alias = next((a for a in _FILE_COLUMN_ALIASES.get(name, ()) if a in renamed), None)
            if alias is not None:
                renamed[renamed.index(alias)] = name
    return renamed


def _read_rows(path: Path, task: TaskConfig) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Column names and (line number, fields) rows of a TSV/CSV file. TSVs are read with quoting off because GLUE
    sentences contain bare quote characters (SST-2, CoLA) that a CSV reader would take as field delimiters.
    The first row is a header when it names any expected column; otherwise only CoLA's headerless layout is
    recognised, since guessing other layouts would silently train on the wrong column."""
    delimiter = _DELIMITERS[path.suffix]
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        try:
            rows = [(reader.line_num, row) for row in reader if row]
        except UnicodeDecodeError as err:
            raise not_text(path, err) from None
        except csv.Error as err:  # e.g. NUL bytes: a binary file that happens to decode
            raise DataError(f"{path}, line {reader.line_num}: {err}; is it a text TSV / CSV file?") from None
    if not rows:
        raise DataError(f"{path} is empty; the split needs a header and at least one row")
    first = _with_hub_names([cell.strip() for cell in rows[0][1]], [*task.text_fields, task.label_field])
    expected = {*task.text_fields, task.label_field}
    if expected & set(first):
        columns, body = first, rows[1:]
    elif len(first) == len(_COLA_COLUMNS) and first[1].lstrip("-").isdigit():
        columns, body = list(_COLA_COLUMNS), rows
    else:
        raise DataError(
            f"{path}: the first row {first[:6]} names none of the expected columns {sorted(expected)} and is not "
            "CoLA's headerless layout; set task.text_fields / task.label_field to the file's header names"
        )
    for line, row in body:
        if len(row) != len(columns):
            raise DataError(
                f"{path}, line {line}: {len(row)} fields where the header has {len(columns)}; is a field missing "
                "or does a sentence contain the delimiter?"
            )
    return columns, body


def _check_columns(found: list[str], task: TaskConfig, split: str, source: str) -> None:
    """Fail on a missing text or label column, saying which columns exist. A split that has every text field but no
    label column is reported as unlabeled (GLUE test files), since the fix is another split, not another name."""
    text_fields = list(task.text_fields)
    missing_text = [name for name in text_fields if name not in found]
    if missing_text:
        raise DataError(
            f"split '{split}' ({source}) lacks text column(s) {missing_text}; found columns {list(found)}; expected "
            f"task.text_fields={text_fields} and task.label_field='{task.label_field}'"
        )
    if task.label_field not in found:
        raise DataError(
            f"split '{split}' ({source}) has no labels (no '{task.label_field}' column among {list(found)}, as in "
            "GLUE test files); choose another split, or set task.label_field to the file's label column"
        )


def _normalise(dataset: Dataset, task: TaskConfig, split: str, source: str,
               lines: Optional[list[str]] = None) -> Dataset:
    """`dataset` cut to `text_fields + ["label"]`, labels parsed to ids or scores, unlabeled rows dropped. A bad label
    is named by its place in `lines` (a file's line numbers), else by its row counted from 1."""
    where = f"split '{split}' ({source})"
    if len(dataset) == 0:
        raise DataError(f"{where} has no rows; choose another split or fill the file")
    _check_columns(dataset.column_names, task, split, source)
    text_fields = list(task.text_fields)
    label_type = Value("float32") if task.num_labels == 1 else Value("int64")
    features = Features({**{name: Value("string") for name in text_fields}, "label": label_type})

    unlabeled = _UNLABELED
    if task.num_labels == 1 and not all(_cell(value) in _UNLABELED for value in dataset[task.label_field]):
        unlabeled = _NO_SCORE

    def parse(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        places = [lines[index] if lines else f"row {index + 1}" for index in indices]
        return {"label": [_parse_label(value, task.num_labels, f"{where}, {place}", unlabeled)
                          for value, place in zip(batch[task.label_field], places)]}

    parsed = dataset.map(
        parse,
        batched=True,
        with_indices=True,
        remove_columns=[name for name in dataset.column_names if name not in text_fields],
        features=features,
        desc=f"Reading labels of {split}",
    )
    labeled = parsed.filter(
        lambda batch: [value is not None for value in batch["label"]], batched=True, desc=f"Dropping unlabeled {split}"
    )
    if len(labeled) == 0:
        raise DataError(
            f"{where} has no labels (every label is missing or -1, as in GLUE test files); choose another split "
            "for task.train_split / task.eval_split (kasa-eval: split=)"
        )
    if len(labeled) < len(parsed):
        logger.warning("%s: dropped %d unlabeled rows of %d", where, len(parsed) - len(labeled), len(parsed))
    return labeled.select_columns([*text_fields, "label"])


def _cell(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _parse_label(value: Any, num_labels: int, where: str,
                 unlabeled: frozenset[str] = _UNLABELED) -> Optional[Union[int, float]]:
    """A class id or score from a file cell or Hub value; None for an unlabeled row (a value in `unlabeled`).
    String class names map to the Hub's GLUE ids (see _LABEL_NAMES)."""
    text = _cell(value)
    if text in unlabeled:
        return None
    if num_labels == 1:
        try:
            score = float(text)
        except ValueError:
            message = f"{where}: score {text!r} is not a number, as regression (task.num_labels=1) needs"
            raise DataError(message) from None
        if not math.isfinite(score):  # a nan or inf label turns the loss, or every correlation, into nan
            raise DataError(f"{where}: score {text!r} is not a finite number: fix or remove that row")
        return score
    names = _LABEL_NAMES.get(num_labels, {})
    try:
        label = int(text)
    except ValueError:
        if text.lower() not in names:
            known = f" or one of GLUE's label names {list(names)}" if names else ""
            raise DataError(f"{where}: label {text!r} is not a class id 0..{num_labels - 1}{known}: write the labels "
                            f"as class ids (task.num_labels={num_labels}; 1 for a regression score)") from None
        label = names[text.lower()]
    if not 0 <= label < num_labels:
        raise DataError(f"{where}: label {label} is outside 0..{num_labels - 1}: number the classes from 0, or set "
                        f"task.num_labels to their count")
    return label


def _subsample(dataset: Dataset, limit: Optional[int], split: str) -> Dataset:
    """The first `limit` rows after a shuffle with SUBSAMPLE_SEED; all rows when `limit` is None or not smaller."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise DataError(f"max samples for split '{split}' is {limit}; use a positive number or null for all rows")
    return dataset.shuffle(seed=SUBSAMPLE_SEED).select(range(limit))
