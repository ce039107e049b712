"""Where a split's rows come from: a local file in `task.data_dir`, a file named by the split itself, or a Hugging
Face Hub data set."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from kasa.data.errors import DataError

if TYPE_CHECKING:
    import datasets

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
"""File name endings that mark a split value as a file rather than a Hub split name."""


def split_label(split: str) -> str:
    """The name that a split's outputs are filed under (eval_<label>.json, e2e-<label>-predictions.txt, ...): a
    split name as it is, a split given as a path (`mt_bench/question.jsonl`, `/data/e2e/testset.csv`) as its folders
    and file name joined by '-' without the data file's ending, so that it names a file beside the others and never
    a path into other folders."""
    path = Path(split)
    if path.suffix.lower() in DATA_SUFFIXES:
        path = path.with_suffix("")
    label = "-".join(part for part in path.parts if part.strip("./~"))
    return label[-150:] or "split"  # the end says the most; a file name is at most 255 bytes


def find_split_file(data_dir: str | Path, split: str, candidates: Sequence[str],
                    suffixes: Sequence[str] = DATA_SUFFIXES) -> Path:
    """The first of `candidates` (file names) that exists in `data_dir`; `split` itself may also name a file
    relative to data_dir, with or without its extension (`devset` finds devset.csv, `boolq/train` finds
    boolq/train.json), or be the path of a file anywhere. `suffixes`: the file types the caller reads."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"task.data_dir={data_dir} is not a directory: point it at the folder with the data files")
    own = dict.fromkeys(Path(name).suffix for name in candidates if Path(name).suffix)
    names = (*candidates, split, *(f"{split}{suffix}" for suffix in (*own, *suffixes)))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if Path(split).expanduser().is_file():
        return Path(split).expanduser()
    present = sorted(p.name for p in folder.iterdir())[:12]
    folders = [name for name in dict.fromkeys(names) if (folder / name).is_dir()]
    if folders:
        raise DataError(f"{folder / folders[0]} is a folder, not a data file: put the split's file there, or set "
                        "task.train_split / task.eval_split (kasa-eval: split=) to a file")
    raise DataError(
        f"no file for split '{split}' in {folder} (looked for {', '.join(dict.fromkeys(names))}; found {present}): "
        "set task.train_split / task.eval_split (kasa-eval: split=) to one of those files"
    )


def local_split_file(data_dir: Optional[str | Path], split: str, candidates: Sequence[str],
                     suffixes: Sequence[str] = DATA_SUFFIXES) -> Optional[Path]:
    """The local file of `split`, or None when it should come from the Hub. With a data_dir, the file must be there
    (see find_split_file; `suffixes`: the file types the caller reads). Without one, a split that is the path of an
    existing file is read directly (e.g. the MT-Bench question file beside a Hub training set), one that looks like a
    file name but does not exist is an error, and anything else is a Hub split name."""
    if data_dir is not None:
        return find_split_file(data_dir, split, candidates, suffixes)
    path = Path(split).expanduser()
    if path.is_file():
        return path
    if path.suffix.lower() in DATA_SUFFIXES:
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        raise DataError(f"split '{split}' names a file that does not exist{where}: set task.eval_split / "
                        "task.train_split (kasa-eval: split=) to the path of an existing file")
    return None


def load_hub_splits(hub_id: str | None, hub_config: str | None, splits: Sequence[str],
                    local_files: str = "local files") -> dict[str, datasets.Dataset]:
    """Splits of a Hub data set, loaded once. An unreachable Hub (no network, or HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE set with nothing cached), an unknown or gated data set and a missing split each become one
    DataError line saying what to pass instead; `local_files` names what task.data_dir should hold."""
    local = f"task.data_dir=<folder with {local_files}>"
    if not hub_id:
        raise DataError(f"neither task.data_dir nor task.hub_id is set: pass {local} or task.hub_id=<datasets Hub id>")
    name = hub_id if hub_config is None else f"{hub_id}/{hub_config}"
    import datasets  # on first use: its import (pyarrow, pandas) is ~1 s

    try:
        loaded = datasets.load_dataset(hub_id, hub_config)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(f"'{hub_id}' was not found on the Hugging Face Hub (or is gated): check task.hub_id, or pass "
                        f"{local}") from err
    except OSError as err:  # ConnectionError, TimeoutError: how datasets reports an unreachable or offline Hub
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DataError(f"could not reach the Hugging Face Hub for '{name}' ({reason}): pass {local} to use them "
                        "instead") from err
    missing = [split for split in splits if split not in loaded]
    if missing:
        raise DataError(f"'{name}' has no split '{missing[0]}'; its splits are {sorted(loaded)}")
    return {split: loaded[split] for split in splits}


def load_hub_split(hub_id: str | None, hub_config: str | None, split: str) -> datasets.Dataset:
    """One split of a Hub data set (load_hub_splits)."""
    return load_hub_splits(hub_id, hub_config, [split])[split]
