"""Task data: GLUE-style sentence(-pair) classification and regression, from the Hub or from local GLUE files, plus
a small demo set shipped with the package so that a run works with no network at all. The GLUE readers load on
first use (they import datasets and transformers; the prompt templates and errors here do not)."""

from pathlib import Path
from typing import Any

from kasa.data.errors import DataError

DEMO_DATA_DIR: Path = Path(__file__).resolve().parent / "demo"
"""Folder of the shipped demo set (train.tsv, dev.tsv; `sentence`, `label`; 1 = positive review)."""

__all__ = ["DEMO_DATA_DIR", "DataError", "encode_glue", "load_glue_splits"]


def __getattr__(name: str) -> Any:
    if name in ("encode_glue", "load_glue_splits"):
        from kasa.data import glue

        return getattr(glue, name)
    raise AttributeError(f"module 'kasa.data' has no attribute {name!r}")
