"""Multi-process training on the CPU with the gloo backend: what the GPU engines rely on, checked without a GPU.

* The data order: accelerate's seedable sampler, sharded over 2 processes with half the batch each, gives every
  optimiser step the same global batch as 1 process with the full batch.
* DDP: `accelerate launch --config_file configs/accelerate/multi_gpu.json --num_processes 2` (on the CPU:
  ACCELERATE_USE_CPU=1, so accelerate picks gloo) with trainer.batch_size=4 ends with the same adapter as one
  process with trainer.batch_size=8, to 1e-5; so does DeepSpeed ZeRO-3 (deepspeed_zero3.json, DeepSpeed's CPU
  accelerator) when deepspeed is installed, and its run resumed from a mid-training checkpoint ends bit for bit
  like the uninterrupted one (float32: DDP averages two half-batch gradients where one process
  averages the full batch, so the sums run in another order; measured differences are ~3e-7). Dropout is off and
  the tiny BERT is deterministic; with dropout, a resumed DDP run still ends bit for bit like the uninterrupted one.
* Under ZeRO-3, two ranks training a tiny LLaMA with the chunked loss (tests/lm_loss_worker.py) end with the adapter
  of one process with the plain loss.
FSDP2 is in test_fsdp.py, the outer sweep of multi-process jobs in test_sweep_launch.py.

The two runs of the DDP test go concurrently; every process has a time limit, and the ports are chosen free
(accelerate's --main_process_port 0)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import ENV, make_deterministic_bert, run_cli, write_sentiment_data
from lm_loss_worker import STEPS, loss_inputs, optimizer, tiny_kasa_llama

REPO = Path(__file__).resolve().parents[1]
DDP_TOL = 1e-5
TIMEOUT = 600  # seconds per process group: a hung collective fails the test instead of hanging it


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    # A session of its own, so that a timeout kills the launcher and every rank it started.
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, deadline: float, log: Path) -> None:
    try:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"timed out after {TIMEOUT} s: {' '.join(process.args)}\n{log.read_text()[-3000:]}")
    assert process.returncode == 0, f"{' '.join(process.args)} failed:\n{log.read_text()[-4000:]}"


def test_accelerate_config_files_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO / "configs" / "accelerate"
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
                "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(expected)
    assert not list(folder.glob("*.yaml"))  # YAML here would make Hydra list the folder as a kasa-train group
    configs = {name: load_config_from_file(str(folder / f"{name}.json")) for name in expected}
    for name, config in configs.items():
        assert str(config.distributed_type).split(".")[-1] == expected[name], name
        assert config.mixed_precision == "no" and not config.use_cpu, name  # precision comes from the recipe
    assert configs["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    zero3 = configs["deepspeed_zero3"].deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"] is False and zero3["zero3_save_16bit_model"] is True
    assert configs["fsdp"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp"].fsdp_config["fsdp_cpu_ram_efficient_loading"] is False  # the truncation needs full weights


def test_sharded_sampler_gives_every_step_the_same_global_batch():
    """The data order the DDP test relies on, shown directly: shards of batch B/2 concatenate to the batch of B."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    rows = list(range(40))

    def prepared(batch_size: int, processes: int, index: int):
        torch.manual_seed(0)
        loader = DataLoader(rows, batch_size=batch_size, shuffle=True, collate_fn=torch.tensor)
        return prepare_data_loader(loader, num_processes=processes, process_index=index, put_on_device=False,
                                   use_seedable_sampler=True)

    single = prepared(8, 1, 0)
    shards = [prepared(4, 2, i) for i in range(2)]
    for epoch in range(3):
        for loader in (single, *shards):
            loader.set_epoch(epoch)
        whole = [batch.tolist() for batch in single]
        halves = [[batch.tolist() for batch in shard] for shard in shards]
        assert [a + b for a, b in zip(*halves)] == whole
        assert sorted(sum(whole, [])) == rows  # each epoch is a permutation
    assert whole != sorted(whole)  # and it is shuffled


def _deepspeed_importable() -> bool:
    """Asked when the test runs, not at collection, where importing deepspeed cost every worker seconds."""
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - an install without its build tools fails in many ways
        return False
    return True


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """DeepSpeed imports MLflow at its own import (3 s of every DeepSpeed process, kasa[trackers] installed);
    kasa hides it for that import only."""
    if not _deepspeed_importable() or importlib.util.find_spec("mlflow") is None:
        pytest.skip("needs deepspeed and mlflow (kasa[deepspeed,trackers])")
    check = ("import sys; from kasa.training.loop import import_deepspeed_without_mlflow as imp; imp(); "
             "import deepspeed.autotuning.autotuner as tuner; "
             "assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules and not tuner.has_mlflow; "
             "import importlib.util; assert importlib.util.find_spec('mlflow') is not None")
    subprocess.run([sys.executable, "-c", check], env=ENV, check=True, timeout=TIMEOUT)


@pytest.mark.parametrize("engine, base", [
    ("multi_gpu", "float"),
    pytest.param("multi_gpu", "nf4", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                                              reason="bitsandbytes is not installed (kasa[quant])")),
    ("deepspeed_zero3", "float"),
])
def test_two_processes_give_the_same_adapter_as_one(tmp_path, engine, base):
    """DDP (over a float and over an nf4 base), and DeepSpeed ZeRO-3 (its CPU accelerator, gloo): the run's files
    match a 1-process run with the same global batch. ZeRO-3 shards the adapter, the head and the optimizer state, so
    this also checks that the saved adapter is gathered whole, that the gradients are clipped at kasa's
    max_grad_norm, and that a run resumed from a mid-training checkpoint ends bit for bit the same."""
    if engine.startswith("deepspeed") and not _deepspeed_importable():
        pytest.skip("deepspeed is not installed (pip install kasa[deepspeed])")
    model = make_deterministic_bert(tmp_path / "model")
    data = write_sentiment_data(tmp_path / "data")  # 32 rows: 4 steps of 8 per epoch, no ragged last batch
    common = [f"model.path={model}", f"task.data_dir={data}", "trainer.epochs=2", "trainer.lr=2e-2",
              "trainer.max_length=16", "trainer.log_every=1", "logging.progress=false", "method.svd_cache_dir=null",
              "method.rank=4", "method.dropout=0.0", *(["model.quantization=nf4"] if base == "nf4" else []),
              # DeepSpeed clips in its engine, by its own setting: kasa's must reach it (Accelerate's default is 1.0)
              *(["trainer.max_grad_norm=0.05"] if engine.startswith("deepspeed") else [])]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    single = [sys.executable, "-m", "kasa.cli.train", *common, "trainer.batch_size=8", f"hydra.run.dir={one}"]
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(REPO / "configs" / "accelerate" / f"{engine}.json"),
              "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
              "-m", "kasa.cli.train", *common, "trainer.batch_size=4", "trainer.save_every=3"]
    # DDP on the CPU needs ACCELERATE_USE_CPU (accelerate then picks gloo); DeepSpeed runs its CPU accelerator.
    launch_env = {**env, "ACCELERATE_USE_CPU": "1"} if engine == "multi_gpu" else env
    deadline = time.monotonic() + TIMEOUT
    logs = tmp_path / "single.log", tmp_path / "multi.log"
    processes = [_start(single, env, logs[0]), _start([*launch, f"hydra.run.dir={two}"], launch_env, logs[1])]
    for process, log in zip(processes, logs):
        _finish(process, deadline, log)

    assert "MULTI_CPU" not in logs[0].read_text()
    if engine.startswith("deepspeed"):
        assert "DeepSpeed" in logs[1].read_text(), "the run did not go through DeepSpeed"
        for deprecated in ("all_gather_into_tensor", "reduce_scatter_tensor"):  # DeepSpeed's, kept off the console
            assert deprecated not in logs[1].read_text()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 8
    a = load_file(str(one / "checkpoints" / "last" / "adapter_model.safetensors"))
    b = load_file(str(two / "checkpoints" / "last" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= DDP_TOL, f"{engine}: the adapter differs from the 1-process adapter by {worst:.3g}"
    moved = max(a[k].abs().max().item() for k in a if k.endswith("delta_u"))  # delta_u starts at zero
    assert moved > 1000 * DDP_TOL, f"training hardly moved the adapter ({moved:.3g}): the comparison proves nothing"

    # Rank 0 alone writes the run directory: one record per step, the same files as the 1-process run.
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 9))
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / ".hydra" / "overrides.yaml").is_file()  # written by kasa on the main process
    if engine == "multi_gpu" and base == "float":
        _resume_on_one_process(two, tmp_path, single, a)
    if not engine.startswith("deepspeed"):
        return

    # Resume from the mid-training checkpoint of step 6, as after a kill right after it was written.
    assert (two / "checkpoints" / "step-00000006" / "deepspeed").is_dir()  # ZeRO's partitioned optimizer state
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    (resumed / "summary.json").unlink()
    log = tmp_path / "resumed.log"
    process = _start([*launch, f"hydra.run.dir={resumed}", "resume=auto"], launch_env, log)
    _finish(process, time.monotonic() + TIMEOUT, log)
    assert "resumed from" in log.read_text() and "step 6" in log.read_text()
    c = load_file(str(resumed / "checkpoints" / "last" / "adapter_model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b), "the resumed run ended with another adapter"
    assert (resumed / "metrics.jsonl").read_text() == (two / "metrics.jsonl").read_text()


def _resume_on_one_process(two: Path, tmp_path: Path, single: list[str], one_adapter: dict) -> None:
    """The 2-process run, stopped after its mid-epoch checkpoint of step 6, continued by one process: refused while
    a step would train on other examples (4 instead of 8), then, with grad_accum=2 keeping 8 examples a step, it ends
    with the adapter of the 1-process run."""
    resumed = tmp_path / "resumed-on-one"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    (resumed / "summary.json").unlink()
    before = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file() and p.name != ".kasa.lock"}
    command = [*[a for a in single if not a.startswith("hydra.run.dir=")], f"hydra.run.dir={resumed}",
               "trainer.batch_size=4", "resume=auto"]
    refused = run_cli("kasa.cli.train", *command[3:])  # in this process: refused before anything loads
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("error: checkpoint ") and (
        "written by 2 process(es) x trainer.batch_size=4 x trainer.grad_accum=1 = 8 examples per optimiser step; "
        "this launch has 1 process(es) and would take 4: resume on 2 process(es), or keep 8 examples per step "
        "(trainer.batch_size=8 with resume_allow_changes=true)") in refused.stderr
    assert {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file() and p.name != ".kasa.lock"} == before

    resumed_run = run_cli("kasa.cli.train", *command[3:], "trainer.grad_accum=2", "resume_allow_changes=true")
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert "resumed from" in resumed_run.stderr and "step 6" in resumed_run.stderr
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 9))
    c = load_file(str(resumed / "checkpoints" / "last" / "adapter_model.safetensors"))
    worst = max((one_adapter[k] - c[k]).abs().max().item() for k in one_adapter)
    assert worst <= DDP_TOL, f"resumed on one process, the adapter differs by {worst:.3g}"


BUFFER_SYNC_COUNTING_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from torch.nn.parallel import DistributedDataParallel

    count_file = Path(sys.argv.pop(1))
    sync_buffers = DistributedDataParallel._sync_buffers

    def counting_sync_buffers(self):
        with count_file.open("a") as f:
            f.write("x")
        return sync_buffers(self)

    DistributedDataParallel._sync_buffers = counting_sync_buffers
    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:]]
    main()
    """
)


def test_a_two_process_run_with_dropout_resumes_bit_for_bit(tmp_path):
    """With dropout (the tiny BERT's own and the adapter's), each process draws its own masks from its own RNG state,
    and the states part ways as soon as the processes' batches differ in shape: a resumed DDP run ends bit for bit
    like the uninterrupted one only if every process gets back its own state, not the main process's. The first run
    also counts DDP's buffer broadcasts: none after the wrap's first copy, where DDP's default sent every removed
    component from rank 0 before each forward (they never change)."""
    from cli_helpers import make_tiny_bert, write_tsv

    model = make_tiny_bert(tmp_path / "model")
    data = tmp_path / "data"  # sentences of 5 to 9 words: the two processes' batches differ in length
    rows = [[" ".join(["the", noun, "was", *["very"] * (i % 5), adj]), label] for i, (noun, adj, label) in enumerate(
        (noun, adj, label) for noun in ("movie", "food", "place", "service")
        for label, adjs in ((1, ("good", "great", "fine", "nice")), (0, ("bad", "awful", "poor", "sad")))
        for adj in adjs)]
    write_tsv(data / "train.tsv", ["sentence", "label"], rows)
    write_tsv(data / "dev.tsv", ["sentence", "label"], rows[::2])
    run = tmp_path / "run"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch",
                  "--config_file", str(REPO / "configs" / "accelerate" / "multi_gpu.json"),
                  "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"]
    settings = [f"model.path={model}", f"task.data_dir={data}", "trainer.epochs=1", "trainer.batch_size=4",
                "trainer.max_length=16", "trainer.save_every=2", "logging.progress=false", "method.svd_cache_dir=null",
                "method.rank=4", "method.dropout=0.1"]
    launch = [*accelerate, "-m", "kasa.cli.train", *settings]
    env = {**ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    log, driver, syncs = tmp_path / "run.log", tmp_path / "driver.py", tmp_path / "buffer_syncs"
    driver.write_text(BUFFER_SYNC_COUNTING_DRIVER)
    _finish(_start([*accelerate, str(driver), str(syncs), *settings, f"hydra.run.dir={run}"], env, log),
            time.monotonic() + TIMEOUT, log)
    assert not syncs.exists(), f"DDP broadcast the buffers {len(syncs.read_text())} times"
    assert "broadcast_buffers" not in log.read_text()  # torch 2.13's FutureWarning for the deprecated argument

    resumed = tmp_path / "resumed"  # as after a kill right after the step-2 checkpoint
    shutil.copytree(run, resumed)
    for later in (resumed / "checkpoints").glob("step-*"):
        if later.name != "step-00000002":
            shutil.rmtree(later)
    (resumed / "summary.json").unlink()
    log = tmp_path / "resumed.log"
    _finish(_start([*launch, f"hydra.run.dir={resumed}", "resume=auto"], env, log), time.monotonic() + TIMEOUT, log)
    assert "resumed from" in log.read_text() and "step 2" in log.read_text()
    a = load_file(str(run / "checkpoints" / "last" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended with another adapter"
    assert (resumed / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()


@pytest.mark.parametrize("env, argv, expected", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["recipe=demo"], "needs hydra.run.dir"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, ["--multirun", "seed=0,1", "hydra.run.dir=x"], "sweep_launch.py"),
])
def test_multiprocess_launch_guards_are_one_clear_line(monkeypatch, capsys, env, argv, expected):
    from kasa.cli import common
    from kasa.cli.train import _prepare_multiprocess_launch

    monkeypatch.setattr(common, "OTHER_RANK_ERROR_DELAY_S", 0.0)  # rank 1 still says it, after its pause
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        _prepare_multiprocess_launch(["train.py", *argv])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and expected in last


def test_an_error_every_rank_met_alike_is_reported_by_rank_0_only(monkeypatch, capsys):
    """A failed judge reaches every rank alike: a rank other than 0 says nothing and waits for the launcher to stop it
    (a loaded machine may take longer than the pause given to other errors), rank 0 says it at once."""
    from kasa.cli import common
    from kasa.tasks.base import EvaluationFailed

    def judge_fails() -> None:
        raise EvaluationFailed("judging failed: row 2: HTTP 500")

    monkeypatch.setattr(common, "SHARED_ERROR_WAIT_S", 0.0, raising=False)
    monkeypatch.setattr(common, "OTHER_RANK_ERROR_DELAY_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "error: judging failed: row 2: HTTP 500\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            common.run_reporting_errors(judge_fails)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == said


def test_a_multi_process_launch_keeps_every_ranks_arguments(monkeypatch):
    """Hydra writes no .hydra/ of its own (hydra.output_subdir is null): kasa writes it on the main process once the
    run is accepted (the launch test above checks that it is there), so no rank needs extra arguments."""
    from kasa.cli.train import _prepare_multiprocess_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        argv = ["train.py", "hydra.run.dir=runs/x"]
        _prepare_multiprocess_launch(argv)
        assert argv == ["train.py", "hydra.run.dir=runs/x"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = ["train.py"]
    _prepare_multiprocess_launch(argv)  # one process: nothing required
    assert argv == ["train.py"]


def test_chunked_lm_loss_under_deepspeed_zero3_trains_like_one_process(tmp_path):
    """Two ranks under ZeRO-3 (DeepSpeed's CPU accelerator, gloo), each on its own batch, with the chunked loss: the
    losses of rank 0 and the adapter after two AdamW steps equal one process's plain loss on the mean of both."""
    if not _deepspeed_importable():
        pytest.skip("deepspeed is not installed (pip install kasa[deepspeed])")
    from kasa.tasks.lm_loss import labelled_token_loss

    out, log = tmp_path / "zero3.json", tmp_path / "zero3.log"
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(REPO / "configs" / "accelerate" / "deepspeed_zero3.json"),
              "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
              str(Path(__file__).with_name("lm_loss_worker.py")), str(out)]
    _finish(_start(launch, {**ENV, "OMP_NUM_THREADS": "1"}, log), time.monotonic() + TIMEOUT, log)
    got = json.loads(out.read_text())

    model = tiny_kasa_llama()
    adamw = optimizer(model)
    for step in range(STEPS):
        losses = [labelled_token_loss(model, *loss_inputs(step, rank), chunked=False) for rank in (0, 1)]
        (sum(losses) / 2).backward()  # what averaging the two ranks' gradients does
        adamw.step()
        adamw.zero_grad()
        assert got["losses"][step] == pytest.approx(losses[0].item(), rel=1e-6), step
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(got["adapter"]) == sorted(params)
    for name, value in got["adapter"].items():
        torch.testing.assert_close(torch.tensor(value), params[name].detach(), rtol=1e-5, atol=DDP_TOL)
    start = dict(tiny_kasa_llama().named_parameters())
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in params.items())
    assert moved > 1000 * DDP_TOL, f"training hardly moved the adapter ({moved:.3g}): the comparison proves nothing"


@pytest.mark.parametrize("rows,batch_size,processes", [(100, 4, 2), (102, 4, 2), (96, 4, 2), (7, 2, 3), (5, 8, 2)])
def test_the_uneven_batches_warning_counts_what_accelerate_repeats(rows, batch_size, processes):
    """A multi-process run whose rows do not fill the last global batch trains on repeated rows: said, with their
    number, which is what Accelerate's sharded batches really repeat."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from kasa.training.loop import uneven_batches_note

    seen = [i for rank in range(processes) for batch in BatchSamplerShard(
        BatchSampler(range(rows), batch_size, False), processes, rank, even_batches=True) for i in batch]
    repeated = len(seen) - rows
    assert sorted(set(seen)) == list(range(rows))
    note = uneven_batches_note(rows, batch_size, processes, packing=False)
    if repeated:
        assert note.startswith(f"warning: the {rows} training rows do not fill") and f": {repeated} of the" in note
    else:
        assert note is None
    assert uneven_batches_note(rows, batch_size, 1, packing=False) is None


@pytest.mark.parametrize("rows, saved, now", [(200, (2, 2, 3), (2, 6, 1)), (200, (2, 2, 3), (1, 12, 1)),
                                              (102, (2, 4, 1), (1, 8, 1)), (102, (2, 4, 1), (4, 2, 1))])
def test_a_resume_on_another_layout_says_when_its_epochs_end_otherwise(rows, saved, now):
    """A resume with as many examples per step on another layout (2 x 2 x 3 as 2 x 6 x 1) passed check_batch_layout
    and then trained another last step in each epoch, the rows that Accelerate repeats there being others (walk Z):
    said exactly when the last step's rows differ."""
    from collections import Counter

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from kasa.training.checkpoint import TrainState
    from kasa.training.loop import resumed_layout_note

    def last_step_rows(processes: int, batch_size: int, grad_accum: int) -> Counter:
        step = Counter()
        for rank in range(processes):  # one process's loader is not sharded
            batches = list(BatchSampler(range(rows), batch_size, False) if processes == 1 else BatchSamplerShard(
                BatchSampler(range(rows), batch_size, False), processes, rank, even_batches=True))
            step.update(i for batch in batches[-(len(batches) % grad_accum or grad_accum):] for i in batch)
        return step

    differ = last_step_rows(*saved) != last_step_rows(*now)
    note = resumed_layout_note(rows, TrainState(processes=saved[0], batch_size=saved[1], grad_accum=saved[2]),
                               now[1], now[0])
    assert (note is not None) == differ
    assert note is None or note.startswith("warning: each epoch's last step will differ from the run's")


def test_a_launch_that_accelerate_runs_one_by_one_is_refused(monkeypatch):
    """fsdp.json launched on 2 processes without a GPU: Accelerate ran each rank as a world of one, two runs in one
    folder (rank 1 then said the folder was in use by another run); under ACCELERATE_USE_CPU=1 it ran DDP silently."""
    from kasa.training.loop import check_launch

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    # multi_gpu.json without ACCELERATE_USE_CPU: the message blamed FSDP and named the config used (walk AU)
    with pytest.raises(ValueError, match="^accelerate launch started 2 processes with no GPU to run them on together: "
                                         "Accelerate would run each of them alone; without a GPU, launch with "
                                         "ACCELERATE_USE_CPU=1 and configs/accelerate/multi_gpu.json"):
        check_launch("NO", 1)
    assert check_launch("MULTI_CPU", 2) == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="^accelerate launch started 2 processes with an FSDP config, but FSDP needs "
                                         "GPUs: Accelerate would run each"):
        check_launch("NO", 1)
    assert check_launch("MULTI_CPU", 2) == ["warning: the launch's FSDP config is not in use: Accelerate runs "
                                               "MULTI_CPU (FSDP needs GPUs)"]
    assert check_launch("FSDP", 2) == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check_launch("NO", 1) == ["warning: the launch's FSDP config is not in use: Accelerate runs NO (FSDP "
                                        "needs GPUs)"]
