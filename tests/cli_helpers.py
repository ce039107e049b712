"""What the CLI tests share: an offline environment, a tiny BERT classifier saved as a model folder, small data
files written by the tests, and a runner for the real commands."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

from kasa.training.signals import STOP_SIGNALS

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = "good great fine nice bad awful poor sad movie food place service the was very not".split()


def run_cli_process(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` in a fresh process: for the tests of the process boundary itself (the wiring of a
    module to its command, signals, exit statuses seen by a shell)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env or ENV, timeout=600)


def _python_warning_defaults() -> None:
    """Python's own warning filters and printing (pytest's collect warnings instead of showing them)."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` run inside the test process (no new interpreter importing torch): the module runs as
    __main__ with sys.argv and the environment patched, and its exit status, stdout and stderr are returned as
    subprocess.run would. What a run leaves in process-wide state (Hydra's and Accelerate's singletons, logging
    handlers, the environment, the working directory) is put back afterwards, so one run cannot leak into the next."""
    import torch
    from accelerate.state import AcceleratorState, GradientState
    from hydra.core.global_hydra import GlobalHydra

    env = env or ENV
    saved_argv, saved_env, saved_cwd, saved_threads = sys.argv, dict(os.environ), os.getcwd(), torch.get_num_threads()
    saved_signals = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}  # a stopped run ignores them
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []  # so that logging.basicConfig in the command configures a handler of its own, as in a process
    out, err = io.StringIO(), io.StringIO()
    status = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        # OMP_NUM_THREADS is read when torch starts: set what it would give a process (the same sums as a process's)
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", saved_threads)))
        sys.argv = [module, *args]
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            _python_warning_defaults()  # warnings are printed on stderr, as in a process, not collected by pytest
            # runpy warns that the module is already imported: harmless here, the tests import it themselves
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if not isinstance(exit_.code, (int, type(None))):
                    print(exit_.code, file=sys.stderr)
            except Exception:  # what an uncaught exception does to a process: traceback on stderr, status 1
                traceback.print_exc()
                status = 1
    finally:
        GlobalHydra.instance().clear()
        # Accelerate's process-wide state (a singleton): a bf16 run's mixed precision was inherited by the next
        # command's Accelerator() and hid kasa-eval's missing one
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers, root.level = saved_handlers, saved_level
        logging.disable(logging.NOTSET)  # a run stopped before training disables INFO records for its exit
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], status, out.getvalue(), err.getvalue())


def assert_one_line_error(result, *fragments: str, after_the_model_loaded: bool = False) -> None:
    """Exit status 2, one `error:` line holding every fragment, no traceback; and, for a start refused before the
    model loads, no `run directory:` line (naming a folder that the refused start then removes)."""
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert after_the_model_loaded or "run directory:" not in result.stdout + result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def make_tiny_bert(folder: Path, hidden_size: int = 32) -> Path:
    """A tiny random BERT classifier and its tokenizer, saved as a model folder (what model.path points at)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)  # transformers 5 ignores vocab_file=
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def make_deterministic_bert(folder: Path) -> Path:
    """The tiny BERT classifier of the CLI tests, with every dropout off (ranks would draw different masks)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def write_sentiment_data(folder: Path) -> Path:
    """A tiny binary sentiment set in GLUE layout (train.tsv, dev.tsv with a `sentence label` header)."""
    positive, negative = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
    rows = [[f"the {noun} was very {adj}", label]
            for noun in ("movie", "food", "place", "service")
            for label, adjs in ((1, positive), (0, negative)) for adj in adjs]
    write_tsv(folder / "train.tsv", ["sentence", "label"], rows)
    write_tsv(folder / "dev.tsv", ["sentence", "label"], rows[::2])
    return folder


def write_similarity_data(folder: Path) -> Path:
    """A tiny STS-B-layout regression set (GLUE header, `score` column)."""
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    rows = [[i, "g", "f", "y", i, "s", "s", f"the {a} was good", f"the {b} was good", 5.0 if a == b else 1.0 + i % 3]
            for i, (a, b) in enumerate((a, b) for a in ("movie", "food", "place") for b in ("movie", "food", "place"))]
    write_tsv(folder / "train.tsv", header, rows * 2)
    write_tsv(folder / "dev.tsv", header, rows)
    return folder


def train_args(model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"task.data_dir={data}", f"hydra.run.dir={run_dir}", "trainer.epochs=2",
            "trainer.batch_size=8", "trainer.lr=5e-3", "trainer.max_length=16", "trainer.log_every=1",
            "logging.progress=false", "method.svd_cache_dir=null", *extra]


def checkpointed_args(model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny sentiment set's 32 rows at batch 4: 8 steps an epoch, 2 epochs, a resumable checkpoint every 3 steps
    (some mid-epoch): the run the resume and run-safety tests stop, kill and continue."""
    return train_args(model, data, run_dir, "trainer.epochs=2", "trainer.batch_size=4", "trainer.save_every=3",
                      "trainer.keep_checkpoints=3", *extra)


def tiny_run_config(tmp_path: Path):
    """A RunConfig for an in-process run: KaSA r 2 on a tiny BERT, the tiny sentiment set, one epoch, no progress
    bars, output in tmp_path/run."""
    from kasa.config import RunConfig, TaskConfig

    cfg = RunConfig(task=TaskConfig(name="demo", data_dir=str(write_sentiment_data(tmp_path / "data"))))
    cfg.model.name = str(make_tiny_bert(tmp_path / "bert"))
    # Set on the model, as a composed config has them (the method follows the model), and on the method, which
    # the loop reads.
    cfg.model.target_modules, cfg.model.head_modules = ["query", "value"], ["classifier", "pooler"]
    cfg.method.target_modules, cfg.method.trainable_modules = cfg.model.target_modules, cfg.model.head_modules
    cfg.method.rank, cfg.method.svd_cache_dir = 2, None
    cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.max_length, cfg.trainer.log_every = 1, 8, 16, 1
    cfg.logging.progress = False
    cfg.output_dir = str(tmp_path / "run")
    return cfg
