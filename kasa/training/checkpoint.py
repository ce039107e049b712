"""Run-directory files: checkpoints written atomically, resumable training state, metrics as JSON lines.

Layout of `<run>/checkpoints/`:
    step-00000120/   resumable: adapter + heads, optimizer, scheduler, RNG states, counters, AdaLoRA's rank
                     allocator (the newest N kept); the optimizer state is whole and keyed by parameter name (also
                     under FSDP2), except under DeepSpeed, whose ZeRO partitions only its own checkpoint format
                     (`deepspeed/`) can rebuild
    best/            adapter of the best epoch
    last/            adapter of the last finished epoch
A checkpoint directory is first written as `.<name>.<pid>.tmp` and renamed into place, so a kill during a save leaves
the previous checkpoint complete and usable. Under FSDP2 / ZeRO-3 every process takes part in gathering the
tensors whole; the main process alone writes. Only safetensors and `torch.load(weights_only=True)` read them back,
except DeepSpeed's own `deepspeed/` folder, which DeepSpeed's loader unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from kasa.adapters import save_adapter
from kasa.adapters.io import adapter_state, check_removed_components, fill_adapter, full_adapter_state, save_tensors
from kasa.adapters.peft_baselines import allocator_state, load_allocator_state
from kasa.run_dir import ADAPTER_WEIGHTS_FILE, STATE_FILE, resumable_checkpoints, write_atomically, write_json
from kasa.tasks.models import inner_model

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.safetensors"
ALLOCATOR_FILE = "adalora_allocator.pt"  # AdaLoRA's rank allocator (importance averages, rank pattern), AdaLoRA only
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint of its ZeRO optimizer partitions, in place of OPTIMIZER_FILE
DEEPSPEED_TAG = "state"
# What kasa's config sets in each optimiser group (trainer.lr, head_lr, weight_decay; initial_lr is the schedule's
# copy of lr): a resume takes these from the config, the moments and the step count from the checkpoint
CONFIGURED_GROUP_SETTINGS = ("lr", "initial_lr", "weight_decay")


@dataclass
class TrainState:
    """Where a run stands: the counters, the best result so far and the evaluation history. A resumable checkpoint
    stores it as trainer_state.json; `metrics_size` and `regularization_size` are the byte lengths of the run's
    JSON-lines logs at the save, so that a resumed run drops what was logged after it."""

    epoch: int = 0  # epochs finished
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained
    step: int = 0  # optimiser steps taken
    best: float = -math.inf
    best_epoch: int = -1
    last: float | None = None  # the last evaluation's score
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation record
    metrics_size: int = 0
    regularization_size: int = 0
    pending_evaluation: int | None = None  # an epoch trained, its evaluation not done (saved before it): resume runs it
    # The batch layout that wrote the checkpoint (None in checkpoints from before it was recorded): a resume on
    # another number of processes continues only where each optimiser step still trains on the same examples.
    processes: int | None = None
    batch_size: int | None = None  # per process
    grad_accum: int | None = None
    # sha256 of the encoded training rows (`data_fingerprint`; None in checkpoints from before it was recorded): a
    # resume checks that it trains on the data the checkpoint was trained on
    data_fingerprint: str | None = None
    # The run's evaluation split and the sha256 of the examples it evaluates there (the task's `check_evaluation`):
    # kasa-eval files an evaluation of this checkpoint on other data apart, as it does with best/ and last/
    eval_split: str | None = None
    eval_data: str | None = None
    # The held-out loss before and after the run's truncation (the summary's `truncation_loss`; None where it was
    # not measured), absent in checkpoints from before it was recorded: a resume then decomposes again
    truncation_loss: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("last", "pending_evaluation", "processes", "batch_size", "grad_accum", "data_fingerprint",
                    "eval_split", "eval_data"):
            if data[key] is None:  # absent when unset, as runs wrote it before these existed
                del data[key]
        return data

    def continue_with(self, processes: int, batch_size: int, grad_accum: int) -> None:
        """Take up the run under this batch layout: the micro-batches of the epoch done so far are counted in the
        new layout's (`check_batch_layout` made sure they divide), and the layout is what the next save records."""
        if self.processes is not None:
            examples = self.batches_in_epoch * self.batch_size * self.processes
            self.batches_in_epoch = examples // (batch_size * processes)
        self.processes, self.batch_size, self.grad_accum = processes, batch_size, grad_accum

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        """The state from trainer_state.json's fields, each checked against its type (a hand-edited or damaged file
        fails here, before a resume copies a field into the run's records), and the truncation measurement's keys."""
        if not isinstance(data, dict):
            raise ValueError(f"{STATE_FILE} holds {type(data).__name__}, not the training state's fields")
        kinds = typing.get_type_hints(cls)
        known = {k: v for k, v in data.items() if k in kinds}
        for key, value in known.items():
            if not _conforms(value, kinds[key]):
                raise ValueError(f"{STATE_FILE} field {key} is {json.dumps(value)[:60]}, not {_type_name(kinds[key])}")
        measured = known.get("truncation_loss")
        if measured is not None and set(measured) != {"base", "truncated"}:
            raise ValueError(f"{STATE_FILE} field truncation_loss has keys {sorted(measured)}, not base and truncated")
        return cls(**known)

    @classmethod
    def of_checkpoint(cls, directory: Path) -> "TrainState":
        """The state a resumable checkpoint saved."""
        return cls.from_json(json.loads((directory / STATE_FILE).read_text()))


def _conforms(value: Any, kind: Any) -> bool:
    """Whether a JSON value is of a TrainState field's type (int, float, str, their lists, dicts and optionals)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind in (int, float):  # a whole number where one counts; JSON's 1.0 is a float, its true is not a number
        numeric = (int,) if kind is int else (int, float)
        return isinstance(value, numeric) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_conforms(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _conforms(v, args[1]) for k, v in value.items())
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(kind))
    return names.get(kind) or {list: "a list", dict: "a mapping"}.get(typing.get_origin(kind), str(kind))


def records_truncation(directory: Path) -> bool:
    """Whether a resumable checkpoint records its run's truncation measurement, so that a resume rebuilds the
    truncated base from the checkpoint's removed triplets alone, without calibrating or decomposing again (older
    checkpoints hold the same triplets but not the measurement that the summary reports)."""
    return "truncation_loss" in json.loads((directory / STATE_FILE).read_text())


def save_checkpoint(directory: Path, accelerator: Accelerator, model: nn.Module, state: dict[str, Any]) -> None:
    """An adapter checkpoint (best/ or last/): adapter, trained heads and `state`. Every process calls it (the
    tensors are gathered whole under FSDP2 / ZeRO-3); the main process writes."""
    unwrapped = inner_model(accelerator, model)
    tensors = full_adapter_state(unwrapped)
    if accelerator.is_main_process:

        def fill(tmp: Path) -> None:
            save_adapter(unwrapped, tmp, tensors)
            write_json(tmp / STATE_FILE, state)

        write_atomically(directory, fill, directory=True)
    accelerator.wait_for_everyone()


def _rng_tensors() -> dict[str, torch.Tensor]:
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt_state], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss if gauss is not None else float("nan")], dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return tensors


def _every_process_rng(accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every process's RNG states, for the main process to write (every process calls it): the main process's under
    their own names, process i's prefixed `process<i>.`. Dropout draws each process's masks from its own states, which
    part ways as soon as the processes' batches differ in shape, so one process's states resume only that process."""
    own = _rng_tensors()
    if accelerator.num_processes == 1:
        return own
    from accelerate.utils import gather_object

    return {f"{_process_prefix(index)}{key}": tensor
            for index, states in enumerate(gather_object([own])) for key, tensor in states.items()}


def _process_prefix(index: int) -> str:
    return f"process{index}." if index else ""


def restore_rng(directory: Path, process_index: int) -> None:
    """Put back this process's RNG states saved in a resumable checkpoint (`epoch_batches` calls it at the right
    moment). A process the checkpoint has no states for (it was written by fewer processes: a resume on another
    layout, which dropout cannot continue exactly anyway) takes the main process's."""
    saved = load_file(str(directory / RNG_FILE))
    prefix = _process_prefix(process_index) if f"{_process_prefix(process_index)}torch" in saved else ""
    tensors = {key: saved[prefix + key] for key in (k for k in saved if "." not in k)}
    torch.set_rng_state(tensors["torch"])
    python = tensors["python"].tolist()
    gauss = tensors["python_gauss"].item()
    random.setstate((python[0], tuple(python[1:]), None if np.isnan(gauss) else gauss))
    pos, has_gauss, np_gauss = tensors["numpy_extra"].tolist()
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), np_gauss))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors])


def epoch_batches(accelerator: Accelerator, loader: Any, epoch: int, resumed_from: Path | None = None,
                  batches_done: int = 0) -> Iterator[Any]:
    """The batches of one epoch. In the first epoch after a resume (`resumed_from`), the checkpoint's first
    `batches_done` batches are skipped and its RNG states put back exactly where the uninterrupted run saved them:
    an end-of-epoch checkpoint before the next epoch's data iterator draws its seed, a mid-epoch one after the
    iterator has drawn it (it is drawn when the first batch is fetched), before the next batch trains."""
    loader.set_epoch(epoch)
    if resumed_from is None:
        yield from loader
        return
    if not batches_done:
        restore_rng(resumed_from, accelerator.process_index)
        yield from loader
        return
    batches: Iterable[Any] = accelerator.skip_first_batches(loader, batches_done)
    for index, batch in enumerate(batches):
        if index == 0:
            restore_rng(resumed_from, accelerator.process_index)
        yield batch


def accumulation_windows(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """The micro-batches of each optimiser step: `size` (trainer.grad_accum) at a time, the epoch's last step taking
    what is left, as Accelerate's gradient accumulation counts them (a resume starts at a step's first)."""
    window: list[Any] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_training_state(directory: Path, accelerator: Accelerator, model: nn.Module, optimizer: Any,
                        scheduler: Any, state: TrainState) -> None:
    """A resumable checkpoint: everything `restore_training_state` needs to continue bit for bit. Every process
    calls it; the files do not depend on how many processes wrote them, except DeepSpeed's optimizer partitions."""
    main = accelerator.is_main_process
    unwrapped = inner_model(accelerator, model)
    tensors = full_adapter_state(unwrapped)
    deepspeed_staging = directory.with_name(f".{directory.name}.{DEEPSPEED_DIR}")
    optimizer_state = None
    rng = _every_process_rng(accelerator)
    allocator = allocator_state(unwrapped)
    if _uses_deepspeed(accelerator):  # every process writes its ZeRO partitions, then they move in with the rest
        if main:
            shutil.rmtree(deepspeed_staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        model.save_checkpoint(str(deepspeed_staging), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        accelerator.wait_for_everyone()
    else:  # keyed by parameter name and whole, also when FSDP2 shards it
        # imported here, not at the top: ~1 s that kasa-eval and kasa-export, which never save one, would pay
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main:

        def fill(tmp: Path) -> None:
            save_adapter(unwrapped, tmp, tensors)
            if optimizer_state is None:
                os.replace(deepspeed_staging, tmp / DEEPSPEED_DIR)
            else:
                torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            if allocator is not None:
                torch.save(allocator, tmp / ALLOCATOR_FILE)
            save_tensors(rng, tmp / RNG_FILE)
            write_json(tmp / STATE_FILE, state.to_json())  # last: its presence marks the checkpoint complete

        write_atomically(directory, fill, directory=True)
    accelerator.wait_for_everyone()


def load_resumable_weights(directory: Path, model: nn.Module, base_truncated: bool = True) -> None:
    """The adapter and head weights of a resumable checkpoint, into the adapted `model` before
    `accelerator.prepare` shards it (and before DeepSpeed copies them into its optimizer). Its files were checked
    whole before the model loaded (kasa.training.preflight.check_resume_checkpoint). A model adapted with
    `initialise=False` (not `base_truncated`) has its base truncated by the triplets the checkpoint removed."""
    saved = load_file(str(directory / ADAPTER_WEIGHTS_FILE))
    target = adapter_state(model)
    missing = sorted(set(target) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {directory} does not match this run (missing {missing[:3]}): resume the "
                         "run that wrote it, with the same model and method")
    for key, tensor in target.items():  # a method.rank or task.num_labels changed under resume_allow_changes=true
        if saved[key].shape != tensor.shape:
            raise ValueError(f"checkpoint {directory} does not match this run: its tensor {key} has shape "
                             f"{tuple(saved[key].shape)}, this run's {tuple(tensor.shape)}: resume with the settings "
                             "that wrote it (method.rank, method.truncation_rank, task.num_labels, the model)")
    if not base_truncated:
        check_removed_components(model, saved, None)  # the model's files replaced since, at the same path
        fill_adapter(model, saved)
        return
    with torch.no_grad():
        for key, tensor in target.items():
            if key.endswith(("removed_u", "removed_s", "removed_v")):
                continue  # the base is already truncated by this run's own (identical) decomposition
            tensor.copy_(saved[key])


def restore_training_state(directory: Path, accelerator: Accelerator, model: nn.Module, optimizer: Any,
                           scheduler: Any) -> TrainState:
    """The optimizer and schedule of a resumable checkpoint, into the prepared ones; returns its state. Every
    process calls it. The RNG states are put back later, by `epoch_batches`."""
    deepspeed = _uses_deepspeed(accelerator)
    needed = check_same_engine(directory, accelerator)
    schedule = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper holds the LambdaLR
    configured = [{key: group[key] for key in CONFIGURED_GROUP_SETTINGS} for group in schedule.optimizer.param_groups]
    try:
        if deepspeed:
            model.load_checkpoint(str(needed), tag=DEEPSPEED_TAG, load_module_strict=False,
                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer.optimizer, torch.load(needed, weights_only=True),
                                     options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
        if (directory / ALLOCATOR_FILE).exists():  # checkpoints of AdaLoRA runs (older ones restart its averages)
            load_allocator_state(inner_model(accelerator, model),
                                 torch.load(directory / ALLOCATOR_FILE, weights_only=True))
    except (RuntimeError, ValueError, KeyError, AssertionError) as err:  # DeepSpeed asserts what it cannot read
        raise ValueError(f"checkpoint {directory} cannot be resumed ({str(err).splitlines()[0][:200]}): it is damaged "
                         "or was written by another setup; resume from another one (resume=<checkpoint dir>)") from err
    _follow_the_config(schedule, configured)
    return TrainState.of_checkpoint(directory)


def _follow_the_config(schedule: Any, configured: list[dict[str, float]]) -> None:
    """The loaded optimiser and schedule states brought back the checkpoint's learning rate and weight decay with
    its moments and step count: the config's (`configured`, read from the groups as this run built them) go back
    in, and the learning rate of the step under way is the schedule's, as this run defines it (its length, warmup
    and decay), at the checkpoint's step. For a resume with the run's own settings that changes nothing (the same
    floats, the same product); with changed ones (resume_allow_changes=true) they apply from the resumed step.
    Only kasa's own schedule (build_scheduler's LambdaLR) is known this way: another keeps its loaded state."""
    if not isinstance(schedule, LambdaLR):
        return
    for group, values in zip(schedule.optimizer.param_groups, configured):
        group.update(values)
    schedule.base_lrs = [group["initial_lr"] for group in schedule.optimizer.param_groups]
    schedule._last_lr = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs,
                                                                                    schedule.lr_lambdas)]
    for group, lr in zip(schedule.optimizer.param_groups, schedule._last_lr):
        group["lr"] = lr


def check_same_engine(directory: Path, accelerator: Accelerator) -> Path:
    """Before anything loads: the optimizer state that resuming `directory` under this engine reads (DeepSpeed's own
    checkpoint, or kasa's whole one), refused when the checkpoint was written under the other."""
    deepspeed = _uses_deepspeed(accelerator)
    needed = directory / (DEEPSPEED_DIR if deepspeed else OPTIMIZER_FILE)
    if not needed.exists():
        raise ValueError(f"checkpoint {directory} has no {needed.name}: it was written "
                         f"{'without' if deepspeed else 'with'} DeepSpeed; resume it under the same engine")
    if deepspeed:
        # ZeRO-3 partitions the model states too (a file per process), ZeRO-1/2 keep them whole: DeepSpeed cannot
        # read one as the other, and says so with a bare assertion on every rank
        saved_stage_3 = any((needed / DEEPSPEED_TAG).glob("zero_pp_rank_*_model_states.pt"))
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
        if saved_stage_3 != (stage == 3):
            raise ValueError(f"checkpoint {directory} was written under DeepSpeed ZeRO "
                             f"{'stage 3' if saved_stage_3 else 'stage 1 or 2'}, this launch runs stage {stage}: "
                             "resume it with the launch's DeepSpeed config that wrote it")
    return needed


def check_batch_layout(directory: Path, processes: int, batch_size: int, grad_accum: int,
                       grouped_by_length: bool = False) -> None:
    """Before anything loads: resuming `directory` with this many processes, trainer.batch_size and grad_accum
    continues the run exactly only if every optimiser step trains on as many examples as before (the data order is
    the same permutation of the examples whatever the layout, unless batches are grouped by length, whose order
    follows the batch size), and the epoch's examples done so far end on a step of the new layout. A changed number
    of processes is not a setting, so this is the only check that catches it."""
    saved = TrainState.of_checkpoint(directory)
    if saved.processes is None or (saved.processes, saved.batch_size, saved.grad_accum) == (
            processes, batch_size, grad_accum):
        return
    if saved.processes != processes and (directory / DEEPSPEED_DIR).is_dir():
        raise ValueError(f"checkpoint {directory} holds DeepSpeed's optimizer state in one partition per process, "
                         f"for {saved.processes} process(es): resume it on {saved.processes} process(es)")
    before = saved.processes * saved.batch_size * saved.grad_accum
    now = processes * batch_size * grad_accum
    layout = (f"{saved.processes} process(es) x trainer.batch_size={saved.batch_size} x trainer.grad_accum="
              f"{saved.grad_accum} = {before} examples per optimiser step")
    if saved.processes != processes and before != now:
        hint = (f" (trainer.batch_size={before // (processes * grad_accum)} with resume_allow_changes=true)"
                if before % (processes * grad_accum) == 0 else "")
        raise ValueError(f"checkpoint {directory} was written by {layout}; this launch has {processes} process(es) "
                         f"and would take {now}: resume on {saved.processes} process(es), or keep {before} examples "
                         f"per step{hint}")
    done = saved.batches_in_epoch * saved.batch_size * saved.processes
    if done % now or (done and grouped_by_length and batch_size != saved.batch_size):
        raise ValueError(f"checkpoint {directory} stopped {done} examples into an epoch, written by {layout}; "
                         f"steps of {now} examples cannot continue from there: resume with that layout, or from "
                         "an end-of-epoch checkpoint")


def data_fingerprint(dataset: Any) -> str:
    """sha256 of a training set's encoded rows (every column, in row order), read from its Arrow table: what a
    resume compares with the checkpoint's, to see that it trains on the same data (the same files, tokenizer and
    encoding settings)."""
    import pyarrow as pa

    table = dataset.with_format("arrow")[:]
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table.column(name).combine_chunks()
        digest.update(f"{name}:{column.type};".encode())
        while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            offsets = column.offsets.to_numpy()
            digest.update((offsets - offsets[0]).tobytes())
            column = column.flatten()
        digest.update(column.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def check_same_data(directory: Path, fingerprint: str, allow_changes: bool) -> dict[str, tuple[str, str]]:
    """Resuming `directory` on training data other than its own is refused, or with resume_allow_changes=true
    returned as a change to record (like a setting's); checkpoints from before the fingerprint was recorded pass."""
    saved = TrainState.of_checkpoint(directory).data_fingerprint
    if saved is None or saved == fingerprint:
        return {}
    if not allow_changes:
        raise ValueError(f"the training data differ from those {directory} was trained on (the encoded rows' "
                         f"fingerprint {saved[:12]} -> {fingerprint[:12]}: a data file, the tokenizer or an encoding "
                         "setting changed): resume on the same data, or pass resume_allow_changes=true to go on "
                         "with these (recorded in config.json)")
    return {"training data (fingerprint)": (saved[:12], fingerprint[:12])}


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for path in resumable_checkpoints(run_dir)[:-keep] if keep > 0 else resumable_checkpoints(run_dir):
        shutil.rmtree(path, ignore_errors=True)


class MetricsLog:
    """metrics.jsonl: one JSON object per logging step (type "train") and per evaluation (type "eval")."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: name the file (a resume truncates any partial line)
            raise OSError(err.errno, err.strerror, str(self.path)) from err

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def last_position(self) -> tuple[int, int]:
        """Where the log ends: (step, 0 for a train record or 1 for an evaluation, which follows its step's train
        record); (0, 0) when empty. A line cut short by a crash does not count."""
        if not (self.enabled and self.path.exists()):
            return 0, 0
        for line in reversed(self.path.read_text().splitlines()):
            try:
                record = json.loads(line)
                return int(record["step"]), int(record["type"] == "eval")
            except (ValueError, KeyError, TypeError):
                continue
        return 0, 0

    def truncate(self, size: int) -> bool:
        """Drop what was logged after a checkpoint, so a resumed run writes the same file as an uninterrupted one.
        False when it holds less than at the checkpoint (deleted or cut short since): truncating would pad it with
        zero bytes up to `size`; a line cut in half there is dropped, so that the next record starts a line of its
        own instead of running on in the broken one, where no reader would find it."""
        if not self.enabled:
            return True
        if self.size() < size:
            if self.path.exists():
                data = self.path.read_bytes()
                if data and not data.endswith(b"\n"):
                    with self.path.open("r+b") as f:
                        f.truncate(data.rfind(b"\n") + 1)
            return False
        if self.path.exists():
            with self.path.open("r+") as f:
                f.truncate(size)
        return True

