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


@pytest.mark.parametrize("reader, name, text", [
    (load_commonsense_file, "test.json", '[{"instruction": "x", "output": "y", "answer": "y"}]'),
    (load_mt_bench_questions, "question.jsonl", '{"question_id": 1, "category": "writing", "turns": ["Hi"]}\n'),
    (read_rows, "train.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "z", "output": "w"}\n'),
    (read_rows, "train.json", '[{"instruction": "x", "output": "y"}]'),
])
def test_a_byte_order_mark_is_read_past(tmp_path, reader, name, text):
    """A UTF-8 BOM (Windows editors) was refused by the JSON readers though the GLUE and E2E readers took it."""
    (tmp_path / "plain").write_text(text, encoding="utf-8")
    (tmp_path / name).write_text(text, encoding="utf-8-sig")
    assert (tmp_path / name).read_bytes().startswith(b"\xef\xbb\xbf")
    assert reader(tmp_path / name) == reader(tmp_path / "plain")


def test_a_broken_json_file_is_named_where_it_breaks(tmp_path):
    """The error pointed at line 1 (of a failed JSON-lines reading) for a JSON list cut short, or for line 3."""
    rows = [f'{{"instruction": "row {i}", "output": "y"}}' for i in range(4)]
    cut = tmp_path / "cut.json"
    cut.write_text("[\n" + ",\n".join(rows) + ",\n")
    with pytest.raises(DataError, match=r"cut.json is not a valid JSON list \(Expecting value: line 6 column 1"):
        read_rows(cut)
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(rows[:2] + ['{"instruction": "broken'] + rows[2:]) + "\n")
    with pytest.raises(DataError, match=r"lines.jsonl: line 3 is not JSON \(Unterminated string"):
        read_rows(lines)
