"""The training recipe, top to bottom: `setup` (run directory, model and adapters, data, optimiser, resume), then
epochs of `train_step`s (task loss plus KaSA's auxiliary loss), `evaluate_and_save` after each epoch, and the run
summary.

Accelerate drives devices, precision, gradient accumulation and multi-process runs; everything that writes files
happens on the main process only. `resume=auto` continues from the newest complete resumable checkpoint with the
same weights, optimiser, schedule, RNG states and data position, so the run ends as if never interrupted.

The host reads the loss from the device only at logging steps (a `.item()` is a device sync): non-finite losses are
remembered on the device (`NonFiniteCheck`) and checked at every logging step and before every save and evaluation,
so a run still stops at the first non-finite loss, naming its step, and never saves weights it produced; before every
save and evaluation the trained weights themselves are checked too (a last step can break them under a finite loss).
Nor does a step wait for the device otherwise: the token count stays on the device, and a causal-LM batch comes with
where its loss lies, found on the host by the collator (kasa.tasks.lm_loss.loss_positions)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader

from kasa.adapters import after_optimizer_step, apply_adapters, aux_loss, aux_loss_needs_forward, count_parameters
from kasa.adapters.config import method_uses
from kasa.config import RunConfig, launch_rank
from kasa.evaluation.metrics import improves, main_metric
from kasa.run_dir import (
    BEST_CHECKPOINT,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    EVALUATIONS_DIR,
    GENERATIONS_DIR,
    METRICS_FILE,
    OVERRIDES_KEY,
    REGULARIZATION_FILE,
    RESUMED_WITH_CHANGES_KEY,
    STATE_FILE,
    SUMMARY_FILE,
    HYDRA_DIR,
    TENSORBOARD_DIR,
    TRACKERS_FILE,
    analysis_outputs,
    clean_partial_writes,
    checkpoint_run,
    finite_numbers,
    is_checkpoint_of,
    read_config,
    software_versions,
    step_dir_name,
    sweep_record,
    write_atomically,
    write_json,
)
from kasa.tasks import build_task
from kasa.tasks.base import EvaluationFailed
from kasa.training.checkpoint import (
    MetricsLog,
    TrainState,
    accumulation_windows,
    check_batch_layout,
    check_same_data,
    check_same_engine,
    data_fingerprint,
    epoch_batches,
    load_resumable_weights,
    prune_checkpoints,
    records_truncation,
    restore_rng,
    restore_training_state,
    save_checkpoint,
    save_training_state,
)
from kasa.tasks.batching import LengthGroupedSampler
from kasa.training.calibration import (
    START_CHECK_EXAMPLES,
    batches_of,
    calibration_rows,
    damage_warning,
    mean_loss,
)
from kasa.training.console import Console
from kasa.tasks.models import load_tokenizer, stop_buffer_broadcast, whole_weights
from kasa.training.preflight import (
    RunStart,
    check_config_values,
    check_not_a_sweep,
    check_run_start,
    check_same_settings,
    ignored_precision_warning,
)
from kasa.training.run_lock import RunLock
from kasa.training.schedule import build_scheduler
from kasa.training.signals import StopSignals, TrainingInterrupted, raised_by_a_collective, resume_command
from kasa.training.trackers import (
    check_trackers,
    end_trackers,
    recorded_tracker_ids,
    remove_tracker_files,
    start_trackers,
    tracker_files,
)


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; the fully trained task head gets its own learning rate (`trainer.head_lr`). Its fused kernel where the
    parameters' device has one: an adapter has hundreds of small tensors, and the default runs a dozen ops on each
    (on the CPU, SmolLM2's 630 KaSA tensors: 26 ms a step against 7 ms fused)."""
    heads = tuple(cfg.method.trainable_modules)
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_head = ".adapters." not in name and any(f".{h}." in f".{name}" for h in heads)
            (head if in_head else body).append(param)
    groups = [{"params": body, "lr": cfg.trainer.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.trainer.head_lr or cfg.trainer.lr})
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in head + body)
    return torch.optim.AdamW(groups, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, fused=fused)


def peak_memory_mib() -> dict[str, float]:
    """Peak accelerator memory (allocated by torch) and peak resident memory of this process."""
    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["gpu"] = torch.cuda.max_memory_allocated() / 2**20
    return {k: round(v, 1) for k, v in peak.items()}


def _collective_error(err: BaseException) -> str:
    """The first sentence of a failed collective's error, without the source location gloo puts before it."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".") or type(err).__name__


def check_launch(engine: str, processes: int) -> list[str]:
    """The launch against what Accelerate runs (`engine`, its DistributedType, on `processes`): a launch of several
    processes that Accelerate runs one by one (FSDP without a GPU: each would train alone, in the same folder) is
    refused; a DeepSpeed or FSDP config that Accelerate does not use is returned as a warning line."""
    launched = launch_rank()[1]
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if launched > 1 and processes == 1:
        # a launch without ACCELERATE_USE_CPU on a machine without a GPU: Accelerate's DDP and FSDP both want one
        launch = "an FSDP config, but FSDP needs GPUs:" if fsdp else "no GPU to run them on together:"
        raise ValueError(f"accelerate launch started {launched} processes with {launch} Accelerate would run each of "
                         "them alone; without a GPU, launch with ACCELERATE_USE_CPU=1 and "
                         "configs/accelerate/multi_gpu.json (DDP over gloo), or with a DeepSpeed config")
    warnings = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and engine != "DEEPSPEED":
        warnings.append(f"warning: the launch's DeepSpeed config is not in use: Accelerate runs {engine} "
                        "(ACCELERATE_USE_CPU=1 turns DeepSpeed off; unset it to run DeepSpeed on its CPU accelerator)")
    if fsdp and engine != "FSDP":
        warnings.append(f"warning: the launch's FSDP config is not in use: Accelerate runs {engine} (FSDP needs GPUs)")
    return warnings


def import_deepspeed_without_mlflow() -> None:
    """Import DeepSpeed with MLflow hidden from it: DeepSpeed imports MLflow at its own import whenever it is installed
    (for its autotuner, which a kasa run never starts), and with kasa[trackers] that cost every process of a DeepSpeed
    launch 3 of its 4 seconds of import. A run that logs to MLflow imports it afterwards as usual."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError, which DeepSpeed takes as "not installed"
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def repeated_rows(rows: int, batch_size: int, processes: int) -> int:
    """How many of the epoch's first rows Accelerate (as PyTorch's DistributedSampler) repeats to complete the last
    global batch of several processes."""
    return 0 if processes == 1 else -rows % (batch_size * processes)


def resumed_layout_note(rows: int, saved: TrainState, batch_size: int, processes: int) -> str | None:
    """The warning for a resume on another layout that check_batch_layout accepts (as many examples per step) but
    whose epochs end otherwise: the last step of each repeats another number of the epoch's first rows."""
    if saved.processes is None or saved.batch_size is None:  # a checkpoint from before layouts were recorded
        return None
    before, now = repeated_rows(rows, saved.batch_size, saved.processes), repeated_rows(rows, batch_size, processes)
    if before == now:
        return None
    return (f"warning: each epoch's last step will differ from the run's: {processes} process(es) x trainer."
            f"batch_size={batch_size} repeat {now} of the epoch's first rows there, where the run's {saved.processes} "
            f"x {saved.batch_size} repeated {before} (Accelerate's even batches); resume with the run's layout to "
            "continue it exactly")


def uneven_batches_note(rows: int, batch_size: int, processes: int, packing: bool) -> str | None:
    """The warning for a multi-process run whose training rows do not fill its last global batch: Accelerate
    completes it with the epoch's first rows, which one process would not see again."""
    repeated = repeated_rows(rows, batch_size, processes)
    if not repeated:
        return None
    kind = "packed rows" if packing else "training rows"
    return (f"warning: the {rows} {kind} do not fill the last batch of each epoch on {processes} processes x "
            f"{batch_size}: {repeated} of the epoch's first rows are repeated there (Accelerate's even batches), so "
            "the run differs slightly from one process with the same global batch; a row count that is a multiple "
            f"of {batch_size * processes} avoids it")


class NonFiniteCheck:
    """The first non-finite loss of the run and where it happened, kept on the device: observing a loss costs no
    host-device sync; `check` (a sync, and a gather over the processes) raises for it, and with `weights` for a
    non-finite trained weight too."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros(3, device=device)  # step (0: none yet), epoch, loss

    def observe(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        loss = loss.detach().float()
        seen = torch.stack([torch.full_like(loss, step), torch.full_like(loss, epoch), loss])
        self.first = torch.where(~torch.isfinite(loss) & (self.first[0] == 0), seen, self.first)

    def check(self, accelerator: Accelerator, weights: list[torch.Tensor] | None = None, step: int = 0) -> None:
        """Every process calls it at the same points (a collective). `weights`: the trained parameters, checked as
        this process holds them (its shard under FSDP or ZeRO-3), after the optimiser step of `step`."""
        broken = torch.zeros((), device=self.first.device)
        if weights:
            broken = torch.stack([~torch.isfinite(_local(w)).all() for w in weights]).any().float().to(broken.device)
        rows = accelerator.gather(torch.cat([self.first, broken[None]])[None]).tolist()
        found = [row[:3] for row in rows if row[0] > 0]
        if found:
            step, epoch, loss = min(found)
            raise FloatingPointError(
                f"loss became {loss} at step {int(step)} (epoch {int(epoch) + 1}): lower trainer.lr or set "
                "trainer.max_grad_norm; the checkpoints written so far are kept"
            )
        if any(row[3] for row in rows):
            raise FloatingPointError(
                f"the trained weights hold nan or inf after step {step}, whose loss was finite: lower trainer.lr or "
                "set trainer.max_grad_norm; the checkpoints written so far are kept"
            )


def _local(weight: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: an FSDP2 shard's local tensor, ZeRO-3's partition (outside
    forward the parameter itself is empty there), else the parameter."""
    if hasattr(weight, "ds_tensor"):
        return weight.ds_tensor
    return weight.to_local() if hasattr(weight, "to_local") else weight


class TrainingRecipe:
    """One run of `kasa-train`. `run()` = `setup()`, then `train_epoch` for each epoch (each micro-batch through
    `train_step`, each optimiser step through `after_step`), `evaluate_and_save` at epoch ends, then `finish()`.

    Everything the loop reads and writes between steps is an attribute set in `setup`; the counters that a
    checkpoint must restore are in `self.state` (a `TrainState`)."""

    def __init__(self, cfg: RunConfig, resolved_config: dict[str, Any],
                 hydra_files: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.resolved_config = resolved_config
        self.hydra_files = hydra_files or {}  # Hydra's record of the command (.hydra/), written once the run starts
        self.out = Path(cfg.output_dir)
        self.state = TrainState()
        self.tracked_until = (0, 0)  # (step, 0 train / 1 eval) of the last record the trackers had before a resume
        self.progress_text = "training"  # the progress bar's label: epoch and the last logged loss

    # ---------------------------------------------------------------------------------------------------------
    # Setup

    def setup(self) -> None:
        """Accelerator and run directory, the task and its data, trackers, model and adapters, loaders, optimiser and
        schedule, then the resumed state."""
        self.setup_accelerator()
        self.check_start()
        if self.start.finished_summary is not None:
            return
        self.resume_from = self.start.resume_from
        set_seed(self.cfg.seed)
        self.setup_task()
        # after the data's checks, before the model loads: a tracker that cannot start fails in seconds
        resumed_ids = recorded_tracker_ids(self.out) if self.resumes_own_run() else {}
        # an earlier run's TensorBoard and W&B logs, which a fresh start removes once its setup has passed (its new
        # tracker runs write beside them until then)
        self.earlier_tracker_files = set() if self.resumes_own_run() else tracker_files(self.out)
        tracker_ids = resumed_ids | start_trackers(self.accelerator, self.cfg.logging.trackers, self.resolved_config,
                                                   self.out, resumed_ids)  # the recorded ones kept, for a later resume
        # once the checks that refuse a start with one line have passed, before the (long) load of the weights
        self.console.print(f"run directory: {self.out}")
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        self.metrics_log = MetricsLog(self.out / METRICS_FILE, enabled=self.main)
        # per-module [l2, l3_u, l3_v] at every logging step (paper figure 11)
        self.module_log = MetricsLog(self.out / REGULARIZATION_FILE, enabled=self.main)
        if self.resume_from is not None:
            self.resume(self.resume_from)
        trainer = self.cfg.trainer
        self.state.continue_with(self.accelerator.num_processes, trainer.batch_size, trainer.grad_accum)
        # what the next save records
        self.state.data_fingerprint = self.data_fingerprint
        self.state.eval_split, self.state.eval_data = self.cfg.task.eval_split, self.eval_fingerprint
        self.state.truncation_loss = self.truncation_loss
        if self.main:  # only now: a start or resume that does not fit must leave the run's files as they were
            if not self.resumes_own_run():  # a fresh start, or another run's checkpoint continued here
                self.clear_earlier_run()
                if self.resume_from is not None:
                    self.carry_best_over(checkpoint_run(self.resume_from))
            self.write_record()
            if tracker_ids != resumed_ids:
                write_json(self.out / TRACKERS_FILE, tracker_ids)
        self.nonfinite = NonFiniteCheck(self.accelerator.device)
        # non-padding tokens trained on by this process (tokens/s in the summary), counted on the device: reading
        # each batch's count would be a host-device sync per step
        self.tokens = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        self.off_step_seconds, self.off_step_depth = 0.0, 0  # evaluating and saving: not the steps' tokens/s

    @contextlib.contextmanager
    def off_the_steps(self) -> Iterator[None]:
        """Time that the summary's tokens_per_second leaves out (evaluations, with their generation and judging, and
        checkpoint saves), counted once where one runs inside another."""
        self.off_step_depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.off_step_depth -= 1
            if self.off_step_depth == 0:
                self.off_step_seconds += time.perf_counter() - start

    def check_start(self) -> None:
        """Before anything loads: check the config's values (before the run directory exists: a refused value
        leaves nothing behind), hold the run directory (main process), check everything else that is cheap (the
        folder, what it holds, the checkpoint to resume from, the model's size without a GPU), then clean what
        interrupted writes left behind."""
        check_config_values(self.cfg)
        if self.accelerator.num_processes > 1:
            check_same_settings(gather_object([self.resolved_config]))
        check_not_a_sweep(self.out)
        self.lock = RunLock(self.out).acquire() if self.main else None
        if self.main and self.out.is_dir():  # a checkpoint that a kill left moved aside, back before one is chosen
            clean_partial_writes(self.out, remove=False)
        self.accelerator.wait_for_everyone()
        self.start: RunStart = check_run_start(self.cfg, self.out, self.resolved_config, self.console.print)
        if self.start.resume_from is not None:
            trainer = self.cfg.trainer
            check_same_engine(self.start.resume_from, self.accelerator)
            check_batch_layout(self.start.resume_from, self.accelerator.num_processes, trainer.batch_size,
                               trainer.grad_accum, trainer.group_by_length)
        if self.main and self.start.finished_summary is None:
            clean_partial_writes(self.out)

    def write_record(self) -> None:
        """config.json and .hydra/ for a fresh start; a resume keeps the run's record, unless settings changed
        (resume_allow_changes=true), which config.json then lists under `resumed_with_changes`."""
        changes = self.start.config_changes
        if self.resumes_own_run() and not changes and (self.out / CONFIG_FILE).is_file():
            return
        config = dict(self.resolved_config)
        if changes:  # the changes of the checkpoint's run so far, this one's or the one continued here
            earlier = read_config(checkpoint_run(self.resume_from)).get(RESUMED_WITH_CHANGES_KEY, [])
            config[RESUMED_WITH_CHANGES_KEY] = [*earlier, {
                "step": self.state.step, "changes": {key: list(values) for key, values in changes.items()}}]
            self.console.print(f"resuming with changed settings: {', '.join(changes)} (recorded in {CONFIG_FILE})")
        write_json(self.out / CONFIG_FILE, config)
        (self.out / HYDRA_DIR).mkdir(exist_ok=True)
        for name, text in self.hydra_files.items():
            write_atomically(self.out / HYDRA_DIR / name, lambda tmp, text=text: tmp.write_text(text))

    def setup_accelerator(self) -> None:
        cfg = self.cfg
        # DeepSpeed without a GPU (its CPU accelerator, which the tests use) needs the gloo backend named:
        # accelerate picks none there and would run every process as a world of one.
        uses_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        if uses_deepspeed:
            import_deepspeed_without_mlflow()
        cpu_deepspeed = uses_deepspeed and not torch.cuda.is_available()
        self.accelerator = Accelerator(
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu_deepspeed else None,
            mixed_precision=cfg.trainer.precision,
            gradient_accumulation_steps=cfg.trainer.grad_accum,
            log_with=check_trackers(cfg.logging.trackers) or None,
            # TensorBoard writes into <run dir>/tensorboard/kasa/
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / TENSORBOARD_DIR)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            step_scheduler_with_optimizer=False,  # the schedule advances once per optimiser step, in train_step
        )
        self.main = self.accelerator.is_main_process
        self.console = Console(enabled=self.main, progress_bars=cfg.logging.progress)
        for warning in check_launch(self.accelerator.distributed_type.value, self.accelerator.num_processes):
            self.console.print(warning)
        if self.accelerator.gradient_accumulation_steps != cfg.trainer.grad_accum:
            # ACCELERATE_GRADIENT_ACCUMULATION_STEPS overrides the value passed in, and Accelerate would divide each
            # micro-batch's loss by it while kasa's steps hold trainer.grad_accum micro-batches
            self.console.print(f"warning: ACCELERATE_GRADIENT_ACCUMULATION_STEPS="
                               f"{self.accelerator.gradient_accumulation_steps} is ignored: a step accumulates "
                               f"trainer.grad_accum={cfg.trainer.grad_accum} micro-batches")
            self.accelerator.gradient_accumulation_steps = cfg.trainer.grad_accum
        ignored = ignored_precision_warning(cfg.trainer.precision, self.accelerator.device.type)
        if ignored and not uses_deepspeed:
            self.console.print(ignored)

    def clear_earlier_run(self) -> None:
        """A fresh start over an earlier run (overwrite=true) removes that run's logs (its TensorBoard and W&B ones
        too), checkpoints, evaluations and figures, so that nothing of it is mixed in or left to be taken for this
        run's: only at the end of setup, so that a start refused on the way (bad data, a model that does not load)
        leaves the earlier run whole."""
        for name in (METRICS_FILE, REGULARIZATION_FILE, SUMMARY_FILE, TRACKERS_FILE):
            (self.out / name).unlink(missing_ok=True)
        for folder in (CHECKPOINTS_DIR, GENERATIONS_DIR, EVALUATIONS_DIR):
            shutil.rmtree(self.out / folder, ignore_errors=True)
        for output in analysis_outputs(self.out):
            output.unlink()
        remove_tracker_files(self.earlier_tracker_files, keep_links=True)

    def carry_best_over(self, source: Path) -> None:
        """Another run's checkpoint continued here: the best epoch so far (which summary.json will name unless this
        run beats it) is that run's, so its best/ comes along, as it stood at the checkpoint; if it has changed since
        (that run trained on and found a better one), a warning says where the weights are not."""
        best_epoch = self.state.best_epoch
        if best_epoch < 0 or not self.cfg.trainer.save_best:
            return
        best = source / CHECKPOINTS_DIR / BEST_CHECKPOINT
        record = best / STATE_FILE
        saved = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        if saved.get("epoch") == best_epoch and saved.get("step", self.state.step + 1) <= self.state.step:
            write_atomically(self.out / CHECKPOINTS_DIR / BEST_CHECKPOINT,
                             lambda tmp: shutil.copytree(best, tmp, dirs_exist_ok=True), directory=True)
            self.console.print(f"best so far: epoch {best_epoch + 1} of {source}, its best/ copied into this run")
        else:
            self.console.print(f"warning: the best epoch so far, {best_epoch + 1}, was trained in {source}, whose "
                               "best/ no longer holds it: this run's best/ holds only what it evaluates itself")

    def resumes_own_run(self) -> bool:
        """Whether the run continues from one of its own checkpoints (not from another run's, `resume=<path>`)."""
        return self.resume_from is not None and is_checkpoint_of(self.resume_from, self.out)

    def setup_task(self) -> None:
        """The task and its data, before anything heavy (a tokenizer loads in seconds): the evaluation's data and
        tools, the encoded training set, and on resume that it is the data the checkpoint was trained on."""
        self.task = build_task(self.cfg)
        # its data, a judge key, Java: now, not after training; what it reads is recorded with each score
        self.eval_fingerprint = self.task.check_evaluation(self.cfg.task.eval_split)
        self.train_dataset = self.task.train_dataset(load_tokenizer(self.cfg.model))
        self.data_fingerprint = data_fingerprint(self.train_dataset)
        if self.cfg.method.truncates:  # the examples the truncation is calibrated and checked on (apply_method)
            self.calibration_rows = calibration_rows(self.train_dataset, self.cfg, START_CHECK_EXAMPLES)
        if self.resume_from is not None:  # the data the checkpoint was trained on
            self.start.config_changes |= check_same_data(self.resume_from, self.data_fingerprint,
                                                         self.cfg.resume_allow_changes)

    def setup_model(self) -> None:
        """The pretrained model with adapters applied, and (on resume) the checkpoint's trained weights."""
        with whole_weights(self.accelerator):
            self.tokenizer, self.model = self.task.load_model()
        # a resume_allow_changes=true of the model or the method (another base, basis, calibration) decomposes again
        rebuilt = self.resume_from is not None and self.cfg.method.uses_layers and not self.cfg.method.uses_peft \
            and records_truncation(self.resume_from) \
            and not any(key.startswith(("model.", "method.")) for key in self.start.config_changes)
        if rebuilt:
            self.reapply_method(self.resume_from)
        else:
            self.apply_method()
        if self.resume_from is not None:  # before prepare: sharding engines and DeepSpeed's optimizer copy from here
            load_resumable_weights(self.resume_from, self.model, base_truncated=not rebuilt)
        if self.cfg.trainer.compile:  # in place: parameter names, and so checkpoints, stay those of the model
            self.model.compile()
        self.params = count_parameters(self.model)
        kind = "adapter" if self.cfg.method.uses_layers else "trained"  # full / bitfit train the model's own weights
        self.console.print(f"{self.cfg.method.method}: {self.params.adapter:,} {kind} parameters, "
                           f"{self.params.trainable:,} trainable of {self.params.total:,}")

    def reapply_method(self, checkpoint: Path) -> None:
        """The adapters of a resumed run, their blocks left empty for the checkpoint's tensors, which truncate the
        base by the triplets it removed (load_resumable_weights): no calibration and no decomposition again. The
        truncation's measurement is the one the run made at its start."""
        self.truncation_loss = TrainState.of_checkpoint(checkpoint).truncation_loss
        if self.cfg.method.truncates:  # truncated where apply_method truncates a fresh start's: the same bits
            self.model.to(self.accelerator.device)
        apply_adapters(self.model, self.cfg.method, initialise=False)

    def apply_method(self) -> None:
        """The method's adapters. A truncating method is measured on a few held-out training examples before and
        after its truncation (summary.json's `truncation_loss`, and a warning line when the loss rises by more than
        5%); the activation basis gathers its calibration statistics here (kasa.training.calibration)."""
        cfg = self.cfg
        self.truncation_loss = None
        if not cfg.method.truncates:
            apply_adapters(self.model, cfg.method)
            return
        collate = self.task.collator(self.tokenizer)
        calibration, held_out = (batches_of(self.train_dataset, rows, collate, cfg) for rows in self.calibration_rows)
        if next(self.model.parameters()).device.type == "cpu":
            self.model.to(self.accelerator.device)  # calibration and measurements on the GPU when there is one
        base = mean_loss(self.task.loss, self.model, held_out) if held_out else None
        apply_adapters(self.model, cfg.method, calibration=calibration, calibration_inputs=self.task.model_inputs)
        if held_out:
            truncated = mean_loss(self.task.loss, self.model, held_out)
            self.truncation_loss = {"base": base, "truncated": truncated}
            warning = damage_warning(base, truncated, cfg.method.target_modules, cfg.method.truncation_basis)
            if warning and self.main:
                print(warning, file=sys.stderr, flush=True)  # one line, never wrapped

    def setup_data(self) -> None:
        """The training loader, prepared before the model: its length is then per process, what step counts need."""
        cfg = self.cfg
        dataset = self.train_dataset
        order: dict[str, Any] = {"shuffle": True}
        if cfg.trainer.group_by_length:  # batches of similar lengths, in an order fixed by seed and epoch
            order = {"sampler": LengthGroupedSampler([len(row["input_ids"]) for row in dataset],
                                                     cfg.trainer.batch_size, cfg.seed)}
        self.train_loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=cfg.trainer.batch_size, collate_fn=self.task.collator(self.tokenizer), **order))
        if note := uneven_batches_note(len(dataset), cfg.trainer.batch_size, self.accelerator.num_processes,
                                       cfg.trainer.packing):
            self.console.print(note)
        if self.resume_from is not None and (note := resumed_layout_note(
                len(dataset), TrainState.of_checkpoint(self.resume_from), cfg.trainer.batch_size,
                self.accelerator.num_processes)):
            self.console.print(note)
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.trainer.grad_accum)
        self.total_steps = steps_per_epoch * cfg.trainer.epochs
        if cfg.trainer.max_steps:
            self.total_steps = min(self.total_steps, cfg.trainer.max_steps)
        self.epochs = math.ceil(self.total_steps / steps_per_epoch)  # what max_steps leaves of trainer.epochs

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        warmup = cfg.trainer.warmup_steps or int(cfg.trainer.warmup_ratio * self.total_steps)
        optimizer = build_optimizer(self.model, cfg)
        scheduler = build_scheduler(optimizer, cfg.trainer.scheduler, warmup, self.total_steps)
        deepspeed_plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if deepspeed_plugin is not None:  # DeepSpeed sizes its engine from these; the loader was prepared above
            deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.trainer.batch_size
            deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.trainer.grad_accum
            # DeepSpeed clips inside its engine (accelerator.clip_grad_norm_ does nothing there), and Accelerate
            # fills an "auto" clipping with 1.0: 0 is DeepSpeed's "no clipping", as max_grad_norm=null is kasa's
            deepspeed_plugin.deepspeed_config["gradient_clipping"] = cfg.trainer.max_grad_norm or 0.0
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        stop_buffer_broadcast(self.model)

    def resume(self, checkpoint: Path) -> None:
        """Optimiser, schedule and counters from `checkpoint`; this run's logs lose what was written after it. (Its
        weights went in before `prepare`, its RNG states go back in `epoch_batches`.)"""
        self.state = restore_training_state(checkpoint, self.accelerator, self.model, self.optimizer, self.scheduler)
        if self.state.step > self.total_steps:  # a schedule made shorter under resume_allow_changes
            raise ValueError(f"checkpoint {checkpoint} has trained {self.state.step} steps, more than the "
                             f"{self.total_steps} of this run's schedule (trainer.max_steps, trainer.epochs): raise "
                             "them, or resume from an earlier checkpoint")
        if self.resumes_own_run():  # another run's logs stay where they are: this folder's start from the checkpoint
            self.tracked_until = self.metrics_log.last_position()  # the records the trackers have had
            for log, size in ((self.metrics_log, self.state.metrics_size),
                              (self.module_log, self.state.regularization_size)):
                if not log.truncate(size):
                    self.console.print(f"warning: {log.path} holds less than when {checkpoint.name} was saved "
                                       "(deleted or cut short since): what is missing stays missing, and the run "
                                       "logs on after it")
        if self.state.pending_evaluation is not None:  # stopped on an epoch's last step, or its evaluation failed
            where = f"the evaluation of epoch {self.state.pending_evaluation + 1} first"
        elif self.state.step < self.total_steps:
            where = f"epoch {self.state.epoch + 1}"
        else:  # killed after the last checkpoint, before the summary
            where = "after the last step"
        self.console.print(f"resumed from {checkpoint} (step {self.state.step}, {where})")

    # ---------------------------------------------------------------------------------------------------------
    # Training

    def run(self) -> dict[str, Any]:
        """The run; a stop signal (SIGTERM, SIGINT, SIGUSR1) ends it after a resumable checkpoint by raising
        TrainingInterrupted. The run directory's lock is held throughout."""
        with StopSignals() as self.stop:
            try:
                self.setup()
                if self.start.finished_summary is not None:
                    self.console.print(f"{self.out} already holds a finished run: nothing to do (overwrite=true "
                                       "trains it again)")
                    return self.start.finished_summary
                self.stop.checkpointable = True
                return self.train_epochs()
            except BaseException as err:
                # A process of a launch whose collective failed: its peer is gone. Signalled like every other, the
                # peer was signalled before it could save and stopped at once: the same stop. Otherwise the peer
                # stopped on an error of its own, which it reported, or was killed: one line here too, not gloo's
                # traceback.
                collective_failed = (isinstance(err, RuntimeError) and launch_rank()[1] > 1
                                     and raised_by_a_collective(err))
                peer_stopped = collective_failed and self.stop.received is not None
                if getattr(self, "accelerator", None) is not None:  # the next job of a sweep starts its own
                    interrupted = peer_stopped or isinstance(err, (TrainingInterrupted, KeyboardInterrupt))
                    end_trackers(self.accelerator, interrupted=interrupted)
                if getattr(self, "lock", None) is not None:  # a refused start leaves no empty run directory (a
                    # sweep job's stays: the sweep's summary lists it among the jobs that did not finish)
                    self.lock.release(discard_empty=sweep_record(self.out.parent) is None)
                if peer_stopped:
                    raise TrainingInterrupted(self.stop.received) from err
                if collective_failed:
                    command = resume_command(sys.argv, self.out, launched=True)
                    raise ValueError(f"a collective operation with the launch's other processes failed "
                                     f"({_collective_error(err)}): "
                                     "another process stopped (its error, if it had one, is above) or was killed; "
                                     f"the run keeps its last checkpoint: fix the cause, then continue with: {command}"
                                     ) from err
                raise
            finally:
                if getattr(self, "lock", None) is not None:
                    self.lock.release()

    def train_epochs(self) -> dict[str, Any]:
        start, self.off_step_seconds = time.perf_counter(), 0.0
        self.progress = self.console.progress(self.total_steps, self.epochs, completed=self.state.step)
        try:
            if self.state.pending_evaluation is None and self.state.batches_in_epoch and \
                    self.state.step >= self.total_steps:
                # resumed at the last step of a schedule made shorter (resume_allow_changes: trainer.max_steps or
                # epochs) part way through an epoch: that epoch ends here and is evaluated, as in a fresh run
                self.state.pending_evaluation = self.state.epoch
                self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0
            if self.state.pending_evaluation is not None:  # resumed after a failed evaluation: that one first,
                # from the RNG states that it met in the run (an evaluation draws from them), and the next epoch
                # from those it leaves, as if it had not failed
                restore_rng(self.resume_from, self.accelerator.process_index)
                self.resume_from = None
                self.evaluate_and_save(self.state.pending_evaluation)
                self.save_resumable()
            while self.state.epoch < self.cfg.trainer.epochs and self.state.step < self.total_steps:
                epoch = self.state.epoch
                self.train_epoch(epoch)
                self.state.epoch, self.state.batches_in_epoch = epoch + 1, 0
                finished = self.state.epoch >= self.cfg.trainer.epochs or self.state.step >= self.total_steps
                if self.cfg.trainer.evaluate_every_epoch or finished:
                    self.evaluate_and_save(epoch)
                checkpoint = self.save_resumable()
                if not finished and self.stop.stop_requested(self.accelerator):
                    raise TrainingInterrupted(self.stop.received, checkpoint, self.state.step)
        finally:
            self.progress.close()
        train_seconds = time.perf_counter() - start
        self.accelerator.wait_for_everyone()
        return self.finish(train_seconds)

    def train_epoch(self, epoch: int) -> None:
        """The epoch's batches from where the run stands; returns at the epoch's end or at the last step."""
        self.model.train()
        resumed_from, self.resume_from = self.resume_from, None  # only the first epoch after a resume skips
        batches = epoch_batches(self.accelerator, self.train_loader, epoch, resumed_from, self.state.batches_in_epoch)
        for window in accumulation_windows(batches, self.cfg.trainer.grad_accum):
            weights = self.loss_weights(window)
            step_task_loss = 0.0
            for index, (batch, weight) in enumerate(zip(window, weights)):
                step_task_loss = step_task_loss + self.train_step(batch, weight, sync=index == len(window) - 1,
                                                                  aux_weight=self.cfg.trainer.grad_accum / len(window))
                self.state.batches_in_epoch += 1
            self.last_task_loss = step_task_loss
            self.state.step += 1
            self.after_step()
            if self.state.step >= self.total_steps:
                return
            # Every process stops at the same step; on the epoch's last one the epoch's own checkpoint (whose
            # evaluation is due) is the stop's, so that the resumed run replays exactly what the uninterrupted one did.
            epoch_end = self.state.batches_in_epoch >= len(self.train_loader)
            stop = not epoch_end and self.stop.stop_requested(self.accelerator)
            if stop or (self.cfg.trainer.save_every and self.state.step % self.cfg.trainer.save_every == 0):
                checkpoint = self.save_resumable()
                if stop:
                    raise TrainingInterrupted(self.stop.received, checkpoint, self.state.step)

    def loss_weights(self, window: list[dict[str, torch.Tensor]]) -> list[float | torch.Tensor | None]:
        """What each micro-batch's loss is multiplied by, so that the step's task loss is the mean over all the loss
        items (labelled tokens, examples) of its micro-batches on every process, as one batch of them all would
        give: a mean of each micro-batch's own mean would weigh the tokens of short responses more. Accelerate
        divides each micro-batch's loss by trainer.grad_accum and the processes' gradients are averaged, hence
        n_i x grad_accum x processes / (the step's items). None where that is 1 (one micro-batch on one process)."""
        counts = [self.task.loss_items(batch) for batch in window]
        accumulation, processes = self.cfg.trainer.grad_accum, self.accelerator.num_processes
        if processes == 1:
            total = sum(counts)
            return [None if count * accumulation == total else count * accumulation / total for count in counts]
        # the processes' sum stays on the device: the weights scale the losses there, with no host-device sync
        total = self.accelerator.reduce(torch.tensor(sum(counts), device=self.accelerator.device), "sum")
        return [(count * accumulation * processes) / total for count in counts]

    def train_step(self, batch: dict[str, torch.Tensor], weight: float | torch.Tensor | None, sync: bool,
                   aux_weight: float = 1.0) -> torch.Tensor:
        """One micro-batch: forward, backward and, on the last micro-batch of a step (`sync`), the optimiser step.
        Its task loss counts `weight` times (loss_weights); KaSA's auxiliary loss `aux_weight` times, once per step
        in all (the epoch's last step may hold fewer than trainer.grad_accum micro-batches). Returns the task
        loss's share of this process's part of the step's loss (detached, on the device): summed over the
        micro-batches and averaged over the processes, the step's task loss over all its loss items."""
        accelerator = self.accelerator
        self.tokens += batch["attention_mask"].sum()
        # Accelerate's accumulate() with the step's end decided here, by the windows, not by Accelerate's own count
        # (which a look-ahead at the data loader's end would set early)
        accelerator.gradient_state._set_sync_gradients(sync)
        with contextlib.nullcontext() if sync else accelerator.no_sync(self.model):
            # KaSA's terms before the forward pass, so that their backward runs last, or after it where the blocks
            # record them (several processes)
            after_forward = aux_loss_needs_forward()
            aux = None if after_forward else aux_loss(self.model)
            loss_task = self.task.loss(self.model, batch)
            if after_forward:
                aux = aux_loss(self.model)
            loss = loss_task + aux.total if aux is not None else loss_task  # what the logs show
            self.nonfinite.observe(loss, self.state.step + 1, self.state.epoch)
            objective = loss_task if weight is None else loss_task * weight
            if aux is not None:
                objective = objective + (aux.total if aux_weight == 1 else aux.total * aux_weight)
            accelerator.backward(objective)
            if accelerator.sync_gradients and self.cfg.trainer.max_grad_norm:
                accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.max_grad_norm)
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step used, which the logs show
                # AdaLoRA's rank budget (PEFT baselines; a no-op for other methods), then the schedule.
                after_optimizer_step(self.model, self.state.step, self.total_steps)
                self.scheduler.step()
            self.optimizer.zero_grad()
        self.last_aux = aux  # the same for every micro-batch of a step: it depends on the weights only
        return loss_task.detach().float() * ((1.0 if weight is None else weight) / self.cfg.trainer.grad_accum)

    def after_step(self) -> None:
        """After each optimiser step: the progress bar, and at logging steps the losses (read from the device only
        here) and the non-finite check."""
        step = self.state.step
        if step % self.cfg.trainer.log_every == 0 or step == self.total_steps:
            self.log_losses(step)
        self.progress.advance(self.progress_text)

    def log_losses(self, step: int) -> None:
        """Every process reaches a logging step: the logged losses are means over all of them."""
        self.nonfinite.check(self.accelerator)
        aux = self.last_aux
        mean_task = self.accelerator.reduce(self.last_task_loss, "mean")  # each process's share: see train_step
        mean_loss = mean_task + aux.total.detach() if aux is not None else mean_task
        record = {"type": "train", "step": step, "epoch": self.state.epoch, "loss": mean_loss.item(),
                  "task_loss": mean_task.item(), "lr": self.step_lr}
        if aux is not None:
            record |= {"aux_loss": aux.total.item(), "l2": aux.l2.item(), "l3": aux.l3.item()}
            self.module_log.write({"step": step, "modules": aux.module_values()})
        self.log(record, {k: v for k, v in record.items() if k != "type"})
        self.progress_text = self.progress.logged(record)

    def log(self, record: dict[str, Any], tracked: dict[str, Any]) -> None:
        """`record` into metrics.jsonl, `tracked` (its numbers, named for a dashboard) into the trackers, which
        already have the records that a resume repeats after its checkpoint (W&B would refuse them as out of order)."""
        self.metrics_log.write(record)
        if (record["step"], int(record["type"] == "eval")) > self.tracked_until:
            self.accelerator.log(tracked, step=record["step"])

    # ---------------------------------------------------------------------------------------------------------
    # Evaluation and checkpoints

    def evaluate_and_save(self, epoch: int) -> None:
        """Evaluate on the eval split; keep the best and the last adapter. The epoch's training is saved first, as a
        resumable checkpoint whose evaluation is due: an evaluation may take hours (generation, a judge) and fail or
        be killed, and resume=auto then runs it again, from the same random states, instead of the training."""
        with self.off_the_steps():
            self._evaluate_and_save(epoch)

    def _evaluate_and_save(self, epoch: int) -> None:
        state, cfg = self.state, self.cfg
        state.pending_evaluation = epoch
        checkpoint = self.save_resumable()
        if self.stop.stop_requested(self.accelerator):  # a stop on the epoch's last step: the evaluation is due in
            raise TrainingInterrupted(self.stop.received, checkpoint, state.step)  # the checkpoint, not run now
        try:
            self.stop.evaluating = True  # a stop signal now waits for the evaluation, which its line says
            metrics = self.task.evaluate(self.model, self.accelerator, self.tokenizer, cfg.task.eval_split,
                                         self.out / GENERATIONS_DIR / f"epoch-{epoch + 1}")  # each one kept
        except Exception as err:
            self.console.print(f"the evaluation of epoch {epoch + 1} failed; what was trained is kept in {checkpoint}: "
                               "remove the cause, then continue with resume=auto (it evaluates that epoch again)")
            if isinstance(err, EvaluationFailed):  # every process failed here alike: they wait for the main one to
                self.accelerator.wait_for_everyone()  # print, since a launcher stops it once another one has exited
            raise
        finally:
            self.stop.evaluating = False
        state.pending_evaluation = None
        score = main_metric(metrics, self.task.metric)
        record = {"type": "eval", "epoch": epoch, "step": state.step, "split": cfg.task.eval_split, **metrics}
        self.log(record, {f"eval/{k}": v for k, v in metrics.items()})
        state.history.append(record)
        self.console.print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        improved = improves(score, state.best if state.best_epoch >= 0 else None)  # nan-safe
        if improved:
            state.best, state.best_epoch = score, epoch
        state.last = score
        saved = {"epoch": epoch, "step": state.step, "split": cfg.task.eval_split, "metric": self.task.metric,
                 "score": score, "metrics": metrics, "eval_data": self.eval_fingerprint}  # what kasa-eval compares
        if improved and cfg.trainer.save_best:
            save_checkpoint(self.out / CHECKPOINTS_DIR / BEST_CHECKPOINT, self.accelerator, self.model, saved)
        save_checkpoint(self.out / CHECKPOINTS_DIR / LAST_CHECKPOINT, self.accelerator, self.model, saved)

    def save_resumable(self) -> Path:
        """A resumable checkpoint of the run as it stands. Every process takes part: sharded tensors are gathered."""
        with self.off_the_steps():
            return self._save_resumable()

    def _save_resumable(self) -> Path:
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.nonfinite.check(self.accelerator, trained, self.state.step)
        self.state.metrics_size, self.state.regularization_size = self.metrics_log.size(), self.module_log.size()
        directory = self.out / CHECKPOINTS_DIR / step_dir_name(self.state.step)
        save_training_state(directory, self.accelerator, self.model, self.optimizer, self.scheduler, self.state)
        if self.main:
            prune_checkpoints(self.out, self.cfg.trainer.keep_checkpoints)
        return directory

    def finish(self, train_seconds: float) -> dict[str, Any]:
        """summary.json and the console's table."""
        cfg, state = self.cfg, self.state
        tokens = self.accelerator.reduce(self.tokens, "sum").item()  # every process's
        if not state.history:  # summary.json marks a finished run with a result: never for one that did not evaluate
            raise ValueError(f"the run in {self.out} ended without an evaluation: no summary written")
        # best/ holds the first epoch when no evaluation gave a defined score (a nan Pearson), so that kasa-eval finds
        # a checkpoint; the summary says there is no best.
        defined = state.best_epoch >= 0 and not math.isnan(state.best)
        summary = {
            "task": cfg.task.name,
            "method": cfg.method.method,
            "recipe": cfg.recipe,
            "metric": self.task.metric,
            "best": state.best if defined else None,
            # Epochs count from 1 here, as on the console (metrics.jsonl's `epoch` is the 0-based index); no best
            # epoch (null) when no evaluation gave a defined score.
            "best_epoch": state.best_epoch + 1 if defined else None,
            "last": state.last,
            "epochs_run": state.epoch,
            "steps": state.step,
            "trainable_params_without_head": self.params.adapter,  # the paper's count
            "trainable_params_with_head": self.params.trainable,
            "train_seconds": round(train_seconds, 2),  # this session's, after a resume: evaluations and saves too
            "evaluation_and_saving_seconds": round(self.off_step_seconds, 2),  # of those
            "train_tokens": tokens,  # real (non-padding) tokens trained on in those seconds, every process's
            # the steps' throughput: what packing or group_by_length changes, not the evaluations' generation
            "tokens_per_second": round(tokens / max(train_seconds - self.off_step_seconds, 1e-9), 1),
            "peak_memory_mib": peak_memory_mib(),
            "seed": cfg.seed,
            "processes": self.accelerator.num_processes,  # with trainer.batch_size and grad_accum: the global batch
            # null where the method has no such setting (full fine-tuning's rank, LoRA's beta): not a value it ran with
            **{key: getattr(cfg.method, key) if method_uses(cfg.method.method, key) else None
               for key in ("rank", "beta", "gamma")},
            "overrides": self.resolved_config.get(OVERRIDES_KEY, []),
            "truncation_loss": self.truncation_loss,  # held-out loss before / after the truncation
            "eval_history": [{**record, "epoch": record["epoch"] + 1} for record in state.history],
            "versions": software_versions(),
        }
        if self.main:
            write_json(self.out / SUMMARY_FILE, finite_numbers(summary))  # JSON has no nan
            self.console.summary_table(summary)
            self.console.print(f"run directory: {self.out}")
        self.accelerator.end_training()
        return summary


def train(cfg: RunConfig, resolved_config: dict[str, Any], hydra_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one run as `cfg` describes; `resolved_config` is what config.json records, `hydra_files` what .hydra/
    does (file name -> text). Returns the run summary."""
    return TrainingRecipe(cfg, resolved_config, hydra_files).run()
