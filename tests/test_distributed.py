"""Multi-process training on the CPU with the gloo backend: what the GPU engines rely on, checked without a GPU.

* The data order: accelerate's seedable sampler, sharded over 2 processes with half the batch each, gives every
  optimiser step the same global batch as 1 process with the full batch.
* DDP: `accelerate launch --config_file configs/accelerate/multi_gpu.json --num_processes 2` (on the CPU:
  ACCELERATE_USE_CPU=1, so accelerate picks gloo) with trainer.batch_size=4 ends with the same adapter as one
  process with trainer.batch_size=8, to 1e-5; so does DeepSpeed ZeRO-3 (deepspeed_zero3.yaml, DeepSpeed's CPU
  accelerator) when deepspeed is installed, and its run resumed from a mid-training checkpoint ends bit for bit
  like the uninterrupted one (float32: DDP averages two half-batch gradients where one process
  averages the full batch, so the sums run in another order; measured differences are ~3e-7). Dropout is off and
  the tiny BERT is deterministic.
* FSDP2 (`fully_shard`, what configs/accelerate/fsdp.json selects) runs on the CPU with gloo here: with the KaSA
  parameters sharded over 2 processes, the auxiliary loss of a training forward equals the value of an unsharded
  copy (1e-6 relative), and so do the gradients it produces; so do the chunked causal-LM loss of a sharded tiny
  LLaMA and its gradients against the plain loss of the unsharded model. Under ZeRO-3, two ranks training that LLaMA
  with the chunked loss (tests/lm_loss_worker.py) end with the adapter of one process with the plain loss. A resumable checkpoint written by the sharded ranks
  holds the adapter and the optimizer state whole (equal to an unsharded run's), and a sharded model resumed from it
  takes exactly the same next step as the run that wrote it.

The two runs of the DDP test go concurrently; every process has a time limit, and the ports are chosen free
(accelerate's --main_process_port 0; a file store for the FSDP workers)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import ENV, WORDS, run_cli, write_sentiment_data
from lm_loss_worker import STEPS, loss_inputs, optimizer, tiny_kasa_llama

REPO = Path(__file__).resolve().parents[1]
DDP_TOL = 1e-5
TIMEOUT = 600  # seconds per process group: a hung collective fails the test instead of hanging it


def make_deterministic_bert(folder: Path) -> Path:
    """The tiny BERT classifier of the CLI tests, with every dropout off (ranks would draw different masks)."""
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
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - an install without its build tools fails in many ways
        return False
    return True


@pytest.mark.parametrize("engine, base", [
    ("multi_gpu", "float"),
    pytest.param("multi_gpu", "nf4", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                                              reason="bitsandbytes is not installed (kasa[quant])")),
    pytest.param("deepspeed_zero3", "float", marks=pytest.mark.skipif(
        not _deepspeed_importable(), reason="deepspeed is not installed (pip install kasa[deepspeed])")),
])
def test_two_processes_give_the_same_adapter_as_one(tmp_path, engine, base):
    """DDP (over a float and over an nf4 base), and DeepSpeed ZeRO-3 (its CPU accelerator, gloo): the run's files
    match a 1-process run with the same global batch. ZeRO-3 shards the adapter, the head and the optimizer state, so
    this also checks that the saved adapter is gathered whole, that the gradients are clipped at kasa's
    max_grad_norm, and that a run resumed from a mid-training checkpoint ends bit for bit the same."""
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
        assert "all_gather_into_tensor" not in logs[1].read_text()  # DeepSpeed's deprecated call, kept off the console
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


def test_a_two_process_run_with_dropout_resumes_bit_for_bit(tmp_path):
    """With dropout (the tiny BERT's own and the adapter's), each process draws its own masks from its own RNG state,
    and the states part ways as soon as the processes' batches differ in shape: a resumed DDP run ends bit for bit
    like the uninterrupted one only if every process gets back its own state, not the main process's."""
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
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(REPO / "configs" / "accelerate" / "multi_gpu.json"),
              "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
              "-m", "kasa.cli.train", f"model.path={model}", f"task.data_dir={data}", "trainer.epochs=1",
              "trainer.batch_size=4", "trainer.max_length=16", "trainer.save_every=2", "logging.progress=false",
              "method.svd_cache_dir=null", "method.rank=4", "method.dropout=0.1"]
    env = {**ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    log = tmp_path / "run.log"
    _finish(_start([*launch, f"hydra.run.dir={run}"], env, log), time.monotonic() + TIMEOUT, log)

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


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 on the CPU: the auxiliary loss from sharded KaSA parameters.


def _bert_base() -> torch.nn.Module:
    """A tiny BERT classifier, always the same random weights, no dropout."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def _kasa_bert() -> torch.nn.Module:
    """A tiny BERT with KaSA on query and value, and adapter values far from their init (non-trivial L3 terms)."""
    import kasa

    model = _bert_base()
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules=["query", "value"],
                                                  trainable_modules=["classifier"], beta=1e-2, gamma=1e-1,
                                                  svd_cache_dir=None))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in kasa.adapted_layers(model):
            for param in layer.adapters.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.train()


def _fsdp_inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 50, (2, 7), generator=torch.Generator().manual_seed(seed))


def _grad_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and ("delta_" in n)]


def _shard(model: torch.nn.Module) -> None:
    """FSDP2 as configs/accelerate/fsdp.json sets it up: one unit per BertLayer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)


def _fsdp_worker(rank: int, world_size: int, store: str, results, body, args: tuple) -> None:
    """One rank: join the gloo group, run `body(rank, *args)` and report what it returns (or why it failed)."""
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=TIMEOUT))
        # A sharding failure is a failure of the test, never a skip: the only skip is the checked absence of
        # fully_shard in this torch (in _run_fsdp).
        results.put((rank, "ok", body(rank, *args)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test instead of dying silently
        results.put((rank, "error", traceback.format_exc()[-3000:]))


def _run_fsdp(tmp_path: Path, body, *args) -> list:
    """Run `body` on 2 FSDP2 ranks (CPU, gloo) and return each rank's result, rank 0 first."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this torch has no FSDP2 fully_shard ({err})")
    # forkserver: the server imports torch, transformers and kasa once, then forks both ranks from it.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "kasa", "torch.distributed.fsdp", "accelerate"])
    results = context.Queue()
    store = tmp_path / f"store-{body.__name__}"
    workers = [context.Process(target=_fsdp_worker, args=(rank, 2, str(store), results, body, args))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    try:
        reports = sorted(results.get(timeout=TIMEOUT) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    for rank, status, payload in reports:
        assert status == "ok", f"rank {rank} failed:\n{payload}"
    return [payload for _, _, payload in reports]


def _aux_loss_body(rank: int) -> dict:
    """A training forward and backward of the sharded model: the aux loss, one KaSA parameter's local shard
    shape, and the full gradients."""
    import kasa

    model = _kasa_bert()
    _shard(model)
    sharded = dict(model.named_parameters())
    name = next(n for n in sharded if n.endswith("delta_u"))
    local_shape = tuple(sharded[name].to_local().shape)
    logits = model(input_ids=_fsdp_inputs()).logits
    aux = kasa.aux_loss(model)
    (logits.square().mean() + aux.total).backward()
    grads = {n: sharded[n].grad.full_tensor().tolist() for n in _grad_names(model)}  # collective: all ranks call it
    return {"total": aux.total.item(), "l2": aux.l2.item(), "l3": aux.l3.item(), "param": name,
            "local_shape": local_shape, "grads": grads}


def test_aux_loss_under_fsdp_equals_the_unsharded_value(tmp_path):
    import kasa

    reference = _kasa_bert()
    logits = reference(input_ids=_fsdp_inputs()).logits
    aux = kasa.aux_loss(reference)
    (logits.square().mean() + aux.total).backward()
    params = dict(reference.named_parameters())
    want = {"total": aux.total.item(), "l2": aux.l2.item(), "l3": aux.l3.item()}

    for rank, got in enumerate(_run_fsdp(tmp_path, _aux_loss_body)):
        full_shape = tuple(params[got["param"]].shape)
        assert got["local_shape"][0] == full_shape[0] // 2, f"rank {rank}: {got['param']} is not sharded"
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (rank, key)
        for name, grad in got["grads"].items():
            torch.testing.assert_close(torch.tensor(grad), params[name].grad, rtol=1e-5, atol=1e-7)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def _train(model: torch.nn.Module, optimizer, scheduler, seeds: range) -> None:
    import kasa

    for seed in seeds:
        logits = model(input_ids=_fsdp_inputs(seed)).logits
        (logits.square().mean() + kasa.aux_loss(model).total).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _scheduler(optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LinearLR(getattr(optimizer, "optimizer", optimizer), 1.0, 0.1, total_iters=4)


def _checkpoint_body(rank: int, checkpoint: str) -> dict:
    """Train the sharded model 2 steps, write a resumable checkpoint with the loop's own function, then resume a
    fresh sharded model from it; both take a third step. Reports the full trainable tensors of both."""
    from accelerate import Accelerator

    from kasa.training.checkpoint import TrainState, load_resumable_weights, restore_training_state, save_training_state

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)  # joins the gloo group the worker started: MULTI_CPU, 2 processes
    assert accelerator.num_processes == 2

    def trainable(model: torch.nn.Module) -> dict[str, list]:
        return {n: p.full_tensor().tolist() for n, p in model.named_parameters() if p.requires_grad}

    model = _kasa_bert()
    _shard(model)
    optimizer = accelerator.prepare_optimizer(_optimizer(model))
    scheduler = _scheduler(optimizer)
    _train(model, optimizer, scheduler, range(2))
    save_training_state(Path(checkpoint), accelerator, model, optimizer, scheduler, TrainState(step=2))

    resumed = _kasa_bert()
    load_resumable_weights(Path(checkpoint), resumed)  # before sharding, as the loop does
    _shard(resumed)
    resumed_optimizer = accelerator.prepare_optimizer(_optimizer(resumed))
    resumed_scheduler = _scheduler(resumed_optimizer)
    state = restore_training_state(Path(checkpoint), accelerator, resumed, resumed_optimizer, resumed_scheduler)
    _train(model, optimizer, scheduler, range(2, 3))
    _train(resumed, resumed_optimizer, resumed_scheduler, range(2, 3))
    return {"step": state.step, "continued": trainable(model), "resumed": trainable(resumed)}


def test_resumable_checkpoint_under_fsdp_is_whole_and_resumes_exactly(tmp_path):
    """FSDP2 shards the adapter and the optimizer state: the checkpoint still holds them whole (equal to an
    unsharded run's), loads without kasa's loop (kasa.load_adapter), and a sharded run resumed from it takes the
    same next step as the run that wrote it."""
    import kasa
    from kasa.training.checkpoint import OPTIMIZER_FILE

    checkpoint = tmp_path / "step-00000002"
    reports = _run_fsdp(tmp_path, _checkpoint_body, str(checkpoint))

    reference = _kasa_bert()
    optimizer = _optimizer(reference)
    scheduler = _scheduler(optimizer)
    _train(reference, optimizer, scheduler, range(2))
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    params = dict(reference.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    for name in trained:
        torch.testing.assert_close(saved[name], params[name].detach(), rtol=1e-5, atol=1e-6)
    moved = max((saved[n] - _kasa_bert().state_dict()[n]).abs().max().item() for n in trained if "delta_u" in n)
    assert moved > 1e-3, "two steps hardly moved the adapter: the comparison proves nothing"

    whole = torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True)
    assert sorted(whole["state"]) == sorted(trained)  # keyed by parameter name, every parameter present
    for name in trained:
        exp_avg = optimizer.state[params[name]]["exp_avg"]
        torch.testing.assert_close(whole["state"][name]["exp_avg"], exp_avg, rtol=1e-5, atol=1e-7)

    plain = kasa.load_adapter(_bert_base(), checkpoint)
    inputs = _fsdp_inputs(9)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=inputs).logits, reference.eval()(input_ids=inputs).logits,
                                   rtol=1e-5, atol=1e-6)

    for rank, report in enumerate(reports):
        assert report["step"] == 2, rank
        assert sorted(report["resumed"]) == sorted(trained)
        for name in trained:
            assert report["resumed"][name] == report["continued"][name], f"rank {rank}: {name} differs after resume"
# ----------------------------------------------------------------------------------------------------------------
# The outer sweep for multi-process jobs (scripts/sweep_launch.py): one launch per combination, then the summary.

SWEEP_SCRIPT = REPO / "scripts" / "sweep_launch.py"


def _sweep_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_launch", SWEEP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_grid_splits_only_top_level_commas():
    sweep = _sweep_module()
    fixed, jobs = sweep.build_grid(["recipe=glue/roberta_base_cola", "method.beta=1e-4,1e-3",
                                    "model.target_modules=[query,value]", "seed=0,1", "+x='a,b'"])
    assert fixed == ["recipe=glue/roberta_base_cola", "model.target_modules=[query,value]", "+x='a,b'"]
    assert jobs == [["method.beta=1e-4", "seed=0"], ["method.beta=1e-4", "seed=1"],
                    ["method.beta=1e-3", "seed=0"], ["method.beta=1e-3", "seed=1"]]
    assert sweep.build_grid(["seed=0"]) == (["seed=0"], [[]])
    for bad in (["hydra.run.dir=x"], ["--multirun"], ["seed"]):
        with pytest.raises(ValueError):
            sweep.build_grid(bad)


def test_sweep_launch_runs_each_job_and_summarizes(tmp_path, capfd, monkeypatch):
    """The script runs in this process (its checks and loop), each job in a process of its own."""
    sweep = _sweep_module()
    for name, value in ENV.items():  # what the jobs inherit
        monkeypatch.setenv(name, value)
    model = make_deterministic_bert(tmp_path / "model")
    data = write_sentiment_data(tmp_path / "data")
    sweep_dir = tmp_path / "sweep"
    launcher = f"{sys.executable} -m kasa.cli.train"  # stands in for `accelerate launch ... -m kasa.cli.train`
    args = ["--launcher", launcher, "--sweep-dir", str(sweep_dir),
            f"model.path={model}", f"task.data_dir={data}", "trainer.epochs=1", "trainer.batch_size=16",
            "trainer.max_length=16", "logging.progress=false", "method.svd_cache_dir=null", "method.rank=2",
            "method.beta=1e-4,1e-3"]
    assert sweep.main(["--dry-run", *args]) == 0
    dry = capfd.readouterr().out.splitlines()
    assert [line.split()[-2:] for line in dry] == [["resume=auto", f"hydra.run.dir={sweep_dir / '0'}"],
                                                   ["resume=auto", f"hydra.run.dir={sweep_dir / '1'}"]]
    assert not sweep_dir.exists()

    assert sweep.main(args) == 0, capfd.readouterr().err[-4000:]
    jobs = json.loads((sweep_dir / "sweep_jobs.json").read_text())
    assert [(j["job"], j["returncode"]) for j in jobs] == [(0, 0), (1, 0)]
    for index, beta in enumerate(("1e-4", "1e-3")):
        summary = json.loads((sweep_dir / str(index) / "summary.json").read_text())
        assert summary["beta"] == float(beta) and f"method.beta={beta}" in summary["overrides"]
    for name in ("sweep_summary.md", "sweep_summary.csv", "heatmap.png"):
        assert (sweep_dir / name).is_file(), name
    rows = (sweep_dir / "sweep_summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # a header and one setting per beta

    # Run again with job 1 as if stopped after its last checkpoint: job 0 is skipped, job 1 continues.
    (sweep_dir / "1" / "summary.json").unlink()
    capfd.readouterr()
    assert sweep.main(args) == 0
    again = capfd.readouterr()
    assert again.out.count("already finished, skipped") == 1 and "resumed from" in again.out + again.err
    assert (sweep_dir / "1" / "summary.json").is_file()

    assert sweep.main([*args[:-1], "method.beta=1e-4,-1"]) == 2  # checked before any launch
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "error: job 1 (method.beta=-1): beta must be >= 0, got -1.0: use 0 to switch the term off; no job has run")

    # Another grid in the same folder: a job whose folder holds a finished run with other settings is refused before
    # any job runs, in kasa-train's words (kasa.training.preflight.check_finished_run), one line per such job, and
    # nothing is written; a job whose folder holds its own run (beta 1e-3 in folder 1) is not refused.
    files = {f: f.read_bytes() for f in sorted(sweep_dir.rglob("*")) if f.is_file() and f.name != ".kasa.lock"}
    refusal = ("error: job {} (method.beta={}): {} already holds a finished run, with other settings (method.beta: {} "
               "-> {}): pass overwrite=true to replace it, or choose another hydra.run.dir (hydra.sweep.dir for a "
               "--multirun sweep); no job has run")
    assert sweep.main([*args[:-1], "method.beta=1e-2,1e-3"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [refusal.format(0, "1e-2", sweep_dir / "0", 0.0001, 0.01)]
    assert sweep.main([*args[:-1], "method.beta=1e-3,1e-4"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [refusal.format(0, "1e-3", sweep_dir / "0", 0.0001, 0.001),
                                                           refusal.format(1, "1e-4", sweep_dir / "1", 0.001, 0.0001)]
    assert files == {f: f.read_bytes() for f in sorted(sweep_dir.rglob("*")) if f.is_file() and f.name != ".kasa.lock"}


def test_sweep_launch_refuses_a_runs_folder_as_its_sweep_dir(tmp_path, capfd):
    """The jobs would go into <run>/0 and the summary would report the run's own numbers: refused, nothing written."""
    sweep = _sweep_module()
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"task": "cola", "method": "kasa", "metric": "matthews", "best": 0.5}))
    assert sweep.main(["--launcher", "false", "--sweep-dir", str(run), "seed=0,1"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        f"error: --sweep-dir={run} is a run's folder (summary.json), not a sweep's: choose a folder of the sweep's own "
        "with another --sweep-dir"]
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]


def test_sweep_launch_refuses_a_launcher_that_is_not_there(tmp_path, capfd):
    """A misspelt launcher is one error line before anything is made (it used to be found at the first job, after
    the sweep's folder and sweep_jobs.json were written)."""
    sweep = _sweep_module()
    sweep_dir = tmp_path / "sweep"
    assert sweep.main(["--launcher", "acelerate launch -m kasa.cli.train", "--sweep-dir", str(sweep_dir),
                       "seed=0,1"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: --launcher 'acelerate launch -m kasa.cli.train': no program 'acelerate' on PATH: check its spelling, "
        "or install it (e.g. 'accelerate launch -m kasa.cli.train', or 'python -m kasa.cli.train' for one process)"]
    assert not sweep_dir.exists()


def _chunked_loss_body(rank: int, head_unit: bool) -> dict:
    """kasa's chunked causal-LM loss of the FSDP2-sharded model (the head's weight gathered inside its forward); with
    `head_unit` the head is an FSDP unit of its own, whose hooks wrap its input."""
    from torch.distributed.fsdp import fully_shard

    from kasa.tasks.lm_loss import chunkable_head, labelled_token_loss

    model = tiny_kasa_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        fully_shard(model.lm_head)
    fully_shard(model)
    assert chunkable_head(model) is model.lm_head  # the sharded model takes the chunked loss
    loss = labelled_token_loss(model, *loss_inputs(0, 0), chunked=True)
    loss.backward()
    grads = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "grads": grads}


@pytest.mark.parametrize("head_unit", [False, True])
def test_chunked_lm_loss_under_fsdp_equals_the_plain_unsharded_loss(tmp_path, head_unit):
    from kasa.tasks.lm_loss import labelled_token_loss

    reference = tiny_kasa_llama()
    loss = labelled_token_loss(reference, *loss_inputs(0, 0), chunked=False)
    loss.backward()
    params = dict(reference.named_parameters())
    for rank, got in enumerate(_run_fsdp(tmp_path, _chunked_loss_body, head_unit)):
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-6), rank
        assert set(got["grads"]) == {n for n, p in params.items() if p.grad is not None}
        for name, grad in got["grads"].items():
            torch.testing.assert_close(torch.tensor(grad), params[name].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not _deepspeed_importable(), reason="deepspeed is not installed (pip install kasa[deepspeed])")
def test_chunked_lm_loss_under_deepspeed_zero3_trains_like_one_process(tmp_path):
    """Two ranks under ZeRO-3 (DeepSpeed's CPU accelerator, gloo), each on its own batch, with the chunked loss: the
    losses of rank 0 and the adapter after two AdamW steps equal one process's plain loss on the mean of both."""
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
