"""Files kasa-export writes follow the umask, like every other file kasa writes (safetensors, and so
save_pretrained, creates its files 0600: a merged model another user or a serving process could not read)."""

from __future__ import annotations

import os
import stat

import pytest

from cli_helpers import make_tiny_bert, run_cli, train_args, write_sentiment_data


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_merged_export_files_follow_the_umask(tmp_path, umask_022):
    model, data, run_dir = make_tiny_bert(tmp_path / "bert"), write_sentiment_data(tmp_path / "data"), tmp_path / "run"
    trained = run_cli("kasa.cli.train", *train_args(model, data, run_dir, "method.rank=2", "trainer.epochs=1"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    output = tmp_path / "merged"
    exported = run_cli("kasa.cli.export", f"checkpoint={run_dir}", f"output={output}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in output.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and "kasa_export.json" in modes
    assert all(mode == 0o644 for mode in modes.values()), modes
