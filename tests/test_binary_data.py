"""A binary or compressed data file given to the JSON / E2E / commonsense / MT-Bench readers is one error line that
names the file (as the GLUE reader's), not a bare UnicodeDecodeError."""

from __future__ import annotations

import gzip

import pytest

from kasa.data.errors import DataError
from kasa.data.files import load_commonsense_file, load_mt_bench_questions, read_e2e_file, read_rows


@pytest.mark.parametrize("reader, name", [
    (load_commonsense_file, "test.json"),
    (read_e2e_file, "testset.csv"),
    (load_mt_bench_questions, "question.jsonl"),
    (read_rows, "train.json"),
])
def test_binary_file_is_named(tmp_path, reader, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b'[{"instruction": "x", "output": "y", "answer": "y"}]'))
    with pytest.raises(DataError) as caught:
        reader(path)
    message = str(caught.value)
    assert str(path) in message and "not a UTF-8 text file" in message and "\n" not in message
