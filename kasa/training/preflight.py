"""Checks that run before any model loads: everything cheap that could otherwise fail after minutes of loading and
truncating a large model. Each failure is a ValueError (or OSError) whose message is one line naming the setting
and the fix; the command line turns it into `error: ...` and exit status 2.

- config values: counts >= 1, learning rates > 0, fractions in range, known names, an attention implementation
  that this machine has (`check_config_values`);
- the output folder: a directory we can create and write in (`check_output_dir`), not a sweep's own folder
  (`check_not_a_sweep`); a sweep's folder, not a run's (`check_not_a_run`, before a sweep's first job);
- the checkpoint to resume from: complete, readable, finite (`check_resume_checkpoint`);
- the model's architecture (no weights): a large model with no GPU stops unless `trainer.allow_cpu=true`, and the
  method's targets and ranks must fit its layers (`check_model`);
- the disk of the run directory: room for the checkpoints the run keeps (`check_disk_space`), which a full disk
  would otherwise refuse only at the first save, after up to an epoch of training;
- resuming with settings that differ from the run's saved config (`config_differences`);
- what the run directory holds: a finished run is never touched unless `overwrite=true` (`check_finished_run`), a
  run's checkpoints decide how `resume=auto` starts (`find_resume`).
`check_config_values` and `check_not_a_sweep` run first, before the run directory is created or locked, so that a
refusal leaves nothing on disk; `check_run_start` runs the others, in that order, and says how the run starts."""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shlex
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from kasa.config import RunConfig, dotted_settings, follows_the_model, is_bookkeeping
from kasa.run_dir import (
    ADAPTER_WEIGHTS_FILE,
    CHECKPOINTS_DIR,
    CHOOSE_ANOTHER_RUN_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    OVERRIDES_KEY,
    STATE_FILE,
    SUMMARY_FILE,
    checkpoint_run,
    holds_a_run,
    is_checkpoint_of,
    read_config,
    resumable_checkpoints,
    run_record,
    sweep_record,
)
from kasa.training.schedule import DECAYS

CPU_PARAMETER_LIMIT = 500_000_000
"""Above this many base-model parameters and without a GPU, a run stops at once (`trainer.allow_cpu=true` proceeds):
a 7B model's truncation and steps would take hours to days on a CPU."""

PRECISIONS = ("no", "fp16", "bf16")

CHECKPOINT_FILES_BYTES = 64 * 1024
"""A checkpoint folder's files besides its tensors (adapter config, counters, scheduler, RNG states; ~21 KiB
measured), at most."""
SAVED_TENSOR_BYTES, OPTIMIZER_TENSOR_BYTES = 256, 1024
"""What the files add per tensor: its name in the safetensors header; its name, step and structure in the pickled
optimizer state (measured ~130 and ~1000 bytes): a small adapter's checkpoint is mostly that."""


def _at_least(minimum: float, optional: bool = False) -> Callable[[Any], bool]:
    return lambda v: (optional and v is None) or (v is not None and v >= minimum)


def _positive(optional: bool = False) -> Callable[[Any], bool]:
    return lambda v: (optional and v is None) or (v is not None and math.isfinite(v) and v > 0)


def _fraction(v: Any) -> bool:
    return 0 <= v < 1


# setting -> (test, what it must be)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trainer.epochs": (_at_least(1), "an integer >= 1"),
    "trainer.batch_size": (_at_least(1), "an integer >= 1"),
    "trainer.eval_batch_size": (_at_least(1), "an integer >= 1"),
    "trainer.grad_accum": (_at_least(1), "an integer >= 1"),
    "trainer.max_length": (_at_least(1), "an integer >= 1"),
    "trainer.log_every": (_at_least(1), "an integer >= 1"),
    "trainer.keep_checkpoints": (_at_least(1), "an integer >= 1 (resume needs a resumable checkpoint)"),
    "trainer.max_steps": (_at_least(1, optional=True), "null or an integer >= 1"),
    "trainer.save_every": (_at_least(1, optional=True), "null or an integer >= 1"),
    "trainer.warmup_steps": (_at_least(0), "an integer >= 0"),
    "trainer.lr": (_positive(), "a number > 0"),
    "trainer.head_lr": (_positive(optional=True), "null or a number > 0"),
    "trainer.max_grad_norm": (_positive(optional=True), "null or a number > 0"),
    "trainer.weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "trainer.warmup_ratio": (_fraction, "in [0, 1)"),
    "trainer.label_smoothing": (_fraction, "in [0, 1)"),
    "trainer.precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "trainer.scheduler": (lambda v: v in DECAYS, f"one of {', '.join(DECAYS)}"),
    "task.num_labels": (_at_least(1), "an integer >= 1 (1: regression)"),
    "task.max_train_samples": (_at_least(1, optional=True), "null or an integer >= 1"),
    "task.max_eval_samples": (_at_least(1, optional=True), "null or an integer >= 1"),
    "task.generation.max_new_tokens": (_at_least(1), "an integer >= 1"),
    "task.generation.num_beams": (_at_least(1), "an integer >= 1"),
    "task.generation.batch_size": (_at_least(1), "an integer >= 1"),
    "task.generation.no_repeat_ngram_size": (_at_least(0), "an integer >= 0 (0: off)"),
    "task.generation.temperature": (_positive(), "a number > 0 (do_sample=false decodes without sampling)"),
    "task.generation.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "task.judge.max_retries": (_at_least(0), "an integer >= 0"),
    "task.judge.timeout": (_positive(), "a number of seconds > 0"),
    "task.judge.concurrency": (_at_least(1), "an integer >= 1"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_config_values(cfg: RunConfig, decomposes: bool = True, on_this_machine: bool = True,
                        trains: bool = True) -> None:
    """Values the schema's types allow but a run cannot use (epochs 0, lr -1, ...): the first one found, named.
    `decomposes`: whether the command truncates weights (not kasa-eval, which loads the removed components), and so
    needs method.svd_device on this machine. `trains`: whether it trains (not kasa-eval or kasa-export, which read
    runs that earlier versions trained, in any dtype). `on_this_machine`: whether the command runs the model here (not
    kasa-estimate, which sizes a run for another machine), and so needs the attention implementation here."""
    for key, (test, requirement) in _RULES.items():
        value = _get(cfg, key)
        if not test(value):
            raise ValueError(f"{key}={value} is not allowed: it must be {requirement}")
    if trains and cfg.method.method in ("full", "bitfit") and cfg.model.dtype == "float16":
        raise ValueError(f"method={cfg.method.method} trains the model's own float16 weights, which AdamW cannot "
                         "update in float16 (its second moments underflow; a GPU's fp16 loss scaler refuses them): "
                         "load the model with model.dtype=float32 (trainer.precision=fp16 still computes in float16 "
                         "on a GPU) or model.dtype=bfloat16")
    mixed = {("float16", "bf16"): "bfloat16", ("bfloat16", "fp16"): "float16"}.get((cfg.model.dtype,
                                                                                   cfg.trainer.precision))
    if trains and mixed:  # MiniLM, float16 under bf16 autocast on the CPU: LayerNorm's "mixed dtype" traceback
        raise ValueError(f"model.dtype={cfg.model.dtype} with trainer.precision={cfg.trainer.precision} mixes two "
                         f"half-precision types: load the model with model.dtype={mixed} or float32")
    if cfg.task.train_on_inputs and cfg.task.kind == "glue":
        raise ValueError("task.train_on_inputs=true applies to the generation tasks (e2e, instruction, commonsense), "
                         "whose prompts it adds to the loss; a GLUE classifier has none: leave it out")
    if not on_this_machine:
        return
    from kasa.tasks.models import attention_implementation

    attention_implementation(cfg.model)  # flash-attention without its package or a GPU: now, not after the data
    if decomposes:
        check_svd_device(cfg.method.svd_device)


def ignored_precision_warning(precision: str, device_type: str) -> str | None:
    """The warning line for trainer.precision=fp16 on the CPU, which Accelerate runs in float32 without a word (the
    run, or the evaluation, would be float32 under an fp16 label); None otherwise."""
    if precision == "fp16" and device_type == "cpu":
        return ("warning: trainer.precision=fp16 has no effect on the CPU (Accelerate runs it in float32); "
                "trainer.precision=bf16 runs mixed precision there")
    return None


def unused_override_warnings(cfg: RunConfig, overrides: list[str]) -> list[str]:
    """A warning line for each command-line override of a method setting that the run's method does not use
    (method=lora method.beta=0.1): the run is the same without it."""
    unused = cfg.method.unused_settings()
    lines = []
    for override in overrides:
        key, assigns, _ = override.partition("=")
        section, _, setting = key.lstrip("+~").partition(".")
        name = setting.split(".")[0]  # method.peft_options.init_r: peft_options
        if assigns and section == "method" and name in unused:
            because, where = unused[name]
            lines.append(f"warning: method.{name}={_get(cfg, f'method.{name}')} changes nothing with {because}: it "
                         f"applies to {where}")
    return lines


def check_svd_device(device: str | None) -> None:
    """method.svd_device names a device torch knows and this machine has (it was first used after the model loaded,
    and not at all when the decompositions came from the cache)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"method.svd_device={device} is not a device: use cpu, cuda, cuda:N, or null (a GPU when "
                         "there is one)") from None
    if parsed.type == "cuda" and not (torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"method.svd_device={device}: this machine has {torch.cuda.device_count()} CUDA GPU(s): use "
                         "cpu, or null (a GPU when there is one)")


def check_output_dir(out: Path) -> None:
    """The run directory must be (or become) a folder this process can write files into."""
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"cannot use hydra.run.dir={out}: {parent} is a file; {CHOOSE_ANOTHER_RUN_DIR}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"kasa")
        probe.unlink()
    except OSError as err:
        raise OSError(err.errno, f"cannot write into hydra.run.dir={out} ({err.strerror}): choose a writable folder "
                      "with hydra.run.dir=<path>") from None


def check_not_a_sweep(out: Path) -> None:
    """A sweep's own folder is not a run directory: its runs are its numbered subfolders, and a run written beside
    them would mix with them. Checked before the folder is locked, so that it is left as it was."""
    record = sweep_record(out)
    if record is not None:
        raise ValueError(f"hydra.run.dir={out} is a sweep's folder ({record.name}): pass one of its runs (e.g. "
                         f"hydra.run.dir={out / '0'}), or continue the whole sweep with its command and "
                         f"hydra.sweep.dir={out} resume=auto")


def check_not_a_run(sweep_dir: Path, option: str = "hydra.sweep.dir") -> None:
    """A run's own folder is not a sweep's (the mirror of `check_not_a_sweep`): the jobs would go among its files
    (<run>/0 beside checkpoints/) and the sweep's summary would report the run's own numbers. `option` names the
    setting that chose the folder (sweep_launch.py's --sweep-dir); checked before anything is written."""
    record = run_record(sweep_dir)
    if record is not None:
        raise ValueError(f"{option}={sweep_dir} is a run's folder ({record.name}), not a sweep's: choose a folder of "
                         f"the sweep's own with another {option}")


def check_resume_checkpoint(directory: Path) -> None:
    """A checkpoint to resume from must be complete (its state file is written last), and its files readable (the
    adapter's tensors finite): a broken one is found now, not after the model has loaded. The optimizer's archives
    (the largest files) are checked for their zip directory, at their end, which a truncated copy lacks."""
    import zipfile

    import torch
    from safetensors.torch import load_file

    from kasa.adapters.io import refuse_non_finite
    from kasa.training.checkpoint import (
        ALLOCATOR_FILE,
        DEEPSPEED_DIR,
        OPTIMIZER_FILE,
        RNG_FILE,
        SCHEDULER_FILE,
        TrainState,
    )

    if not directory.is_dir():
        raise FileNotFoundError(f"resume={directory}: no such checkpoint directory")
    for name in (STATE_FILE, ADAPTER_WEIGHTS_FILE, SCHEDULER_FILE, RNG_FILE):
        if not (directory / name).is_file():
            raise ValueError(f"checkpoint {directory} is incomplete ({name} missing): resume from another one")
    deepspeed = directory / DEEPSPEED_DIR  # DeepSpeed's own checkpoint in place of optimizer.pt
    archives = sorted(deepspeed.rglob("*.pt")) if deepspeed.is_dir() else [directory / OPTIMIZER_FILE]
    if not deepspeed.is_dir() and not archives[0].is_file():
        raise ValueError(f"checkpoint {directory} is incomplete ({OPTIMIZER_FILE} missing): resume from another one")
    try:
        TrainState.of_checkpoint(directory)  # its fields' types too: a resume copies them into the run's records
        tensors = load_file(str(directory / ADAPTER_WEIGHTS_FILE))
        load_file(str(directory / RNG_FILE))
        torch.load(directory / SCHEDULER_FILE, weights_only=True)
        if (directory / ALLOCATOR_FILE).is_file():
            torch.load(directory / ALLOCATOR_FILE, weights_only=True)
        for archive in archives:
            zipfile.ZipFile(archive).close()
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types; any failure means unreadable)
        raise ValueError(f"cannot read checkpoint {directory} ({str(err).splitlines()[0][:120]}): it is corrupt or "
                         "truncated; resume from another one (resume=<checkpoint dir>) or start again") from None
    refuse_non_finite(tensors, directory / ADAPTER_WEIGHTS_FILE)


@functools.lru_cache(maxsize=8)
def _architecture(source: str, gguf_file: str | None, trust_remote_code: bool, local_files_only: bool) -> Any:
    """A model's config, read once per process: a sweep checks every job's model, and a GGUF file's header takes
    seconds to parse. Callers change their copy (task_auto_class sets the labels), never this one."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return AutoConfig.from_pretrained(source, **kwargs)


def _checkpoint_config(cfg: RunConfig) -> Any:
    """The model's config as its checkpoint holds it (read once per process; never change it: copy)."""
    from kasa.tasks.models import hub_options, model_source

    return _architecture(model_source(cfg.model), cfg.model.gguf_file, cfg.model.trust_remote_code,
                         bool(hub_options(cfg.model).get("local_files_only")))


def _meta_base_model(cfg: RunConfig) -> Any:
    """The base model from its architecture alone, built on the meta device (no weights, no memory), or None when
    that cannot be known cheaply (the loader then reports any problem itself). An encoder for a causal-LM task is
    refused here (check_decoder)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    from kasa.tasks.models import DTYPES, check_decoder, model_source, task_auto_class

    try:
        config = copy.deepcopy(_checkpoint_config(cfg))
        factory = task_auto_class(cfg, config)
    except Exception:  # noqa: BLE001 (a check only: loading the model itself gives the real error)
        return None
    if factory is AutoModelForCausalLM:
        check_decoder(config, model_source(cfg.model))
    try:
        # The class itself, not from_config: under a DeepSpeed ZeRO-3 launch from_config partitions the model
        # with a collective that the other processes, which do not run this check, would never join.
        model_class = _get_model_class(config, factory._model_mapping)
        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[cfg.model.dtype])  # the tensors' sizes as loaded (a trained head's, say)
        try:
            with torch.device("meta"):
                return model_class(config)
        finally:
            torch.set_default_dtype(default)
    except Exception:  # noqa: BLE001 (a check only: loading the model itself gives the real error)
        return None


def check_model_files(cfg: RunConfig) -> None:
    """model.path holds a model and its tokenizer (see check_model_folder, check_tokenizer_files)."""
    from kasa.tasks.models import check_model_folder, check_tokenizer_files

    check_model_folder(cfg.model)
    check_tokenizer_files(cfg.model)


def check_model(cfg: RunConfig) -> Any:
    """The run against the model's architecture, before any weight downloads or loads: without a GPU, a model above
    CPU_PARAMETER_LIMIT parameters stops unless `trainer.allow_cpu=true`; and the method goes into the meta model
    by the same code as into the real one, so that a target that matches nothing, a rank too large for a layer or a
    trained module that is not there fails now rather than after minutes of loading. Returns that adapted meta
    model, or None where there is none (a PEFT method, an architecture not known cheaply)."""
    import torch

    model = _meta_base_model(cfg)
    if model is None:
        return None
    count = sum(p.numel() for p in model.parameters())
    if not (cfg.trainer.allow_cpu or torch.cuda.is_available()) and count > CPU_PARAMETER_LIMIT:
        raise ValueError(f"{cfg.model.path or cfg.model.name} has {count / 1e9:.2f}B parameters and no GPU is visible: "
                         "on a CPU it would take hours to days; run on a GPU, or pass trainer.allow_cpu=true to "
                         "proceed anyway")
    check_new_head_trains(cfg, model, _checkpoint_config(cfg))
    check_positions(cfg, model)
    if cfg.method.uses_peft:  # PEFT's methods check their targets themselves, on the loaded model
        return None
    from kasa.adapters import apply_adapters

    apply_adapters(model, cfg.method, initialise=False)
    return model


def check_positions(cfg: RunConfig, model: Any) -> None:
    """trainer.max_length within the positions of a model that learned absolute ones (BERT's and RoBERTa's 512,
    GPT-2's 1024): a longer row failed with a tensor-size error after the model had loaded (walk CB). Models with
    rotary or relative positions (LLaMA, DeBERTa-v3) have no such table and no limit here."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in ("position_embeddings", "wpe"):
            # RoBERTa's positions start after its padding index
            limit = module.num_embeddings - (0 if module.padding_idx is None else module.padding_idx + 1)
            if cfg.trainer.max_length > limit:
                from kasa.tasks.models import model_source

                raise ValueError(f"trainer.max_length={cfg.trainer.max_length} is more than the {limit} positions "
                                 f"that {model_source(cfg.model)} has learned ({name}): set trainer.max_length={limit} "
                                 "or less")
            return


def check_new_head_trains(cfg: RunConfig, model: Any, checkpoint_config: Any) -> None:
    """A classification task's head that the checkpoint lacks (a causal LM's `score`, an encoder's `classifier`) is
    initialised at random when the model loads: it must be among the trained modules, or the adapters learn under a
    random, frozen head (SmolLM2 on SST-2 did, with model.head_modules unset; so did a 2-label classifier's checkpoint
    on STS-B, whose head is replaced by one of a single output). `model`: the task's meta model; `checkpoint_config`:
    the model's config as its checkpoint holds it."""
    from kasa.adapters.model import module_matches
    from kasa.tasks.models import model_source

    if cfg.task.kind != "glue" or cfg.method.method == "full":
        return
    architectures = getattr(checkpoint_config, "architectures", None) or []
    if any(name.endswith("ForSequenceClassification") for name in architectures) \
            and checkpoint_config.num_labels == cfg.task.num_labels:  # its own head (one of another size is replaced)
        return

    def trained(head: str) -> bool:
        inside = [name for name, _ in model.named_modules() if name == head or name.startswith(f"{head}.")]
        return any(module_matches(name, target) for name in inside for target in cfg.method.trainable_modules)

    frozen = [head for head, module in model.named_children() if head != model.base_model_prefix
              and any(True for _ in module.parameters()) and not trained(head)]
    if frozen:
        raise ValueError(f"the task's classification head ({', '.join(frozen)}) is new, made at random when the "
                         f"model loads ({model_source(cfg.model)} has none, or one of another size), and this run would "
                         f"leave it frozen; train it with model.head_modules=[{','.join(frozen)}]")


def checkpoint_bytes(adapted_model: Any, keep: int) -> dict[str, int]:
    """What a run's checkpoints take on disk at their most, from its adapted model (the meta one will do): `keep`
    resumable checkpoints plus the one being written before the oldest goes, each the adapter's tensors and AdamW's
    two moments of every trained tensor; best/ and last/, each the adapter's tensors, plus the previous copy that a
    save keeps until the new one is in place."""
    from kasa.adapters.io import adapter_state

    saved = adapter_state(adapted_model).values()
    trained = [p for p in adapted_model.parameters() if p.requires_grad]
    adapter = CHECKPOINT_FILES_BYTES + sum(t.numel() * t.element_size() + SAVED_TENSOR_BYTES for t in saved)
    resumable = adapter + sum(2 * p.numel() * p.element_size() + OPTIMIZER_TENSOR_BYTES for p in trained)
    return {"resumable": resumable, "adapter": adapter, "total": (keep + 1) * resumable + 3 * adapter}


def check_disk_space(out: Path, adapted_model: Any, keep: int) -> None:
    """Room on the run directory's disk for the checkpoints the run will keep (`checkpoint_bytes`), counting those
    already in it (a resume replaces them in turn, overwrite=true deletes them). A disk quota is not visible here, and
    a file system that does not tell its free space is not checked: the check must never be what stops a run."""
    need = checkpoint_bytes(adapted_model, keep)
    try:
        held = sum(f.stat().st_size for f in (out / CHECKPOINTS_DIR).rglob("*") if f.is_file())
        free = shutil.disk_usage(out).free
    except OSError:
        return
    if need["total"] - held > free:
        raise ValueError(f"the disk of {out} has {_size(free)} free, and this run's checkpoints take about "
                         f"{_size(need['total'])} ({keep + 1} resumable checkpoints of {_size(need['resumable'])} "
                         f"while the newest is written, best/ and last/ of {_size(need['adapter'])}): free space, "
                         f"keep fewer with trainer.keep_checkpoints, or {CHOOSE_ANOTHER_RUN_DIR}")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def check_sweep_job(cfg: RunConfig, checked_models: set[str]) -> None:
    """What a sweep checks of each job before the first one runs: the config's values, and the method against the
    model's architecture (a rank too large for a layer, a target that matches nothing) once per model and method
    (`checked_models` holds those done): what a job would otherwise find only when its turn came."""
    check_config_values(cfg)
    key = json.dumps([asdict(cfg.model), asdict(cfg.method), cfg.task.kind, cfg.task.num_labels,
                      cfg.trainer.allow_cpu], sort_keys=True, default=str)
    if key not in checked_models:
        checked_models.add(key)
        check_model_files(cfg)
        check_model(cfg)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings whose value differs between a run's saved config and the one resuming it: {key: (saved, now)}.
    Bookkeeping settings (kasa.config.BOOKKEEPING_SETTINGS), the recorded overrides and method settings that neither
    config's method uses (method.beta of a lora run: the same run, as kasa-train warns) may differ; settings the saved
    config does not have (added to kasa since the run was saved) are not differences."""
    old, new = dotted_settings(saved), dotted_settings(current)
    unused = {f"method.{name}" for name in _unused_method_settings(saved) & _unused_method_settings(current)}
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() & new.keys())
            if old.get(key) != new.get(key) and not is_bookkeeping(key) and key.split(".")[0] != OVERRIDES_KEY
            and ".".join(key.split(".")[:2]) not in unused}


def _unused_method_settings(config: dict[str, Any]) -> set[str]:
    """The method settings (names under `method.`) that a resolved config's method does not use; none for a config
    whose method section kasa cannot read (saved by another version)."""
    from kasa.adapters.config import AdapterConfig

    try:
        return set(AdapterConfig.from_dict(dict(config.get("method") or {})).unused_settings())
    except (TypeError, ValueError):
        return set()


def as_override(key: str, value: Any) -> str:
    """`key=value` as a command-line override that sets that value: null, true / false, numbers and lists as JSON
    (Hydra reads them so), a string as it is where Hydra reads it back as that string, else in quotes."""
    if not isinstance(value, str):
        return f"{key}={json.dumps(value)}"
    if re.fullmatch(r"[A-Za-z_/.][\w/.:-]*", value) and value.lower() not in ("null", "true", "false"):
        return f"{key}={value}"
    return f"{key}='{value}'" if "'" not in value else f"{key}={json.dumps(value)}"


def describe_differences(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())


def check_resume_config(saved_config: Path, current: dict[str, Any], allow_changes: bool,
                        own_run: bool = False) -> dict[str, tuple[Any, Any]]:
    """Refuse to continue a run with settings other than its own (the result would match neither), unless
    `resume_allow_changes=true`; returns the differences so that the run can record them. `own_run`: the checkpoint
    is the output folder's own, whose config.json must be there (a checkpoint kept outside a run has none)."""
    if not saved_config.is_file():  # deleted from the run: the resume could change any setting unseen (walk CB)
        if allow_changes or not own_run:
            return {}
        raise ValueError(f"{saved_config} is missing: cannot tell whether this resume changes settings; put it back, "
                         "or pass resume_allow_changes=true to continue with these settings (written to it again)")
    try:
        saved = json.loads(saved_config.read_text())
    except ValueError as err:
        raise ValueError(f"{saved_config} is corrupt ({err}): cannot tell whether this resume changes settings; "
                         "pass resume_allow_changes=true to continue anyway") from None
    differences = config_differences(saved, current)
    if differences and not allow_changes:
        own = " ".join(shlex.quote(as_override(key, old)) for key, (old, _) in differences.items()
                       if not follows_the_model(key))
        raise ValueError(f"resuming {saved_config.parent} with settings that differ from its own "
                         f"({describe_differences(differences)}): resume with its own ({own}), "
                         "or pass resume_allow_changes=true to continue with these (the change is recorded in "
                         "config.json)")
    return differences


def check_schedule_reaches(cfg: RunConfig, checkpoint: Path) -> None:
    """A trainer.max_steps below the checkpoint's step (resume_allow_changes=true) is refused before the model loads
    (the loop refused it after loading and decomposing); a schedule cut short by fewer epochs needs the data's size
    and is refused by the loop's resume."""
    from kasa.training.checkpoint import TrainState

    step = TrainState.of_checkpoint(checkpoint).step
    if cfg.trainer.max_steps is not None and step > cfg.trainer.max_steps:
        raise ValueError(f"checkpoint {checkpoint} has trained {step} steps, more than the {cfg.trainer.max_steps} of "
                         "this run's schedule (trainer.max_steps): raise it, or resume from an earlier checkpoint")


# Settings that the processes of a multi-node launch may hold differently: where each node finds its own copy of
# the model and data, its SVD cache and calibration memory, and whether it draws progress bars (rank 0 alone does).
NODE_LOCAL_SETTINGS = frozenset({"model.path", "task.data_dir", "method.svd_cache_dir",
                                 "method.calibration_memory_gib", "logging.progress"})


def check_same_settings(configs: list[dict[str, Any]]) -> None:
    """The resolved configs of a launch's processes (rank order) must agree, node-local settings aside: processes
    started with other overrides (a multi-node launch typed twice) would train different runs in lockstep until a
    collective of mismatched sizes aborts one of them."""
    first = dotted_settings(configs[0])
    for rank, config in enumerate(configs[1:], start=1):
        other = dotted_settings(config)
        differing = [key for key in sorted(first.keys() | other.keys()) if first.get(key) != other.get(key)
                     and key not in NODE_LOCAL_SETTINGS and key.split(".")[0] != OVERRIDES_KEY]
        if differing:
            shown = ", ".join(f"{key}: {first.get(key)!r} on rank 0, {other.get(key)!r} on rank {rank}"
                              for key in differing[:3])
            more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
            err = ValueError(f"the launch's processes were started with different settings ({shown}{more}): start "
                             "every process with the same recipe and overrides")
            err.every_rank_alike = True  # every process compares the same gathered configs
            raise err


@dataclass
class RunStart:
    """How a run starts: fresh, from a checkpoint, or not at all (`resume=auto` on a run that already finished)."""

    resume_from: Path | None = None
    finished_summary: dict[str, Any] | None = None  # the finished run's summary.json: nothing to do
    config_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # allowed by resume_allow_changes


def check_finished_run(cfg: RunConfig, out: Path, resolved_config: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of the finished run in `out` when this run leaves it as it is (`resume=auto` and the run's own
    settings, compared on the resolved config: nothing to do), or None when there is none or `overwrite=true`
    replaces it. A finished run is never touched otherwise: without `resume=auto`, or with other settings, the run
    is refused. kasa-train's first check of what its folder holds, and scripts/sweep_launch.py's of every job's
    folder before the first job runs (a job it leaves as it is, it skips)."""
    if not (out / SUMMARY_FILE).is_file() or cfg.overwrite:
        return None
    if cfg.resume != "auto":
        raise FileExistsError(f"{out} already holds a finished run: pass overwrite=true to replace it, or "
                              f"{CHOOSE_ANOTHER_RUN_DIR}")
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text())
    except ValueError as err:
        raise ValueError(f"{out / SUMMARY_FILE} is corrupt ({err}): pass overwrite=true to train again") from None
    differences = config_differences(read_config(out), resolved_config)
    if differences:
        raise FileExistsError(f"{out} already holds a finished run, with other settings "
                              f"({describe_differences(differences)}): pass overwrite=true to replace it, or "
                              f"{CHOOSE_ANOTHER_RUN_DIR}")
    return summary


def find_resume(cfg: RunConfig, out: Path, say: Callable[[str], None]) -> RunStart:
    """What `out` holds, short of a finished run (`check_finished_run`), decides how the run starts: `resume=auto`
    takes the newest checkpoint that reads back whole and finite (`say` names the ones it skips), and refuses to
    start afresh over checkpoints it could not use."""
    if cfg.resume not in (None, "auto"):
        checkpoint = Path(cfg.resume)
        check_resume_checkpoint(checkpoint)
        if not is_checkpoint_of(checkpoint, out) and holds_a_run(out) and not cfg.overwrite:
            # another run's checkpoint continues in a folder of its own: its logs would be cut at the other run's
            # offsets and mixed with this folder's
            raise FileExistsError(f"{out} holds a run of its own, and resume={checkpoint} continues another run: "
                                  f"pass resume=auto to continue the run in {out}, or {CHOOSE_ANOTHER_RUN_DIR} for "
                                  "the continued run, or overwrite=true to replace this folder's run with it")
        return RunStart(resume_from=checkpoint)
    if cfg.resume == "auto":
        found = resumable_checkpoints(out)
        for candidate in reversed(found):
            try:
                check_resume_checkpoint(candidate)
                return RunStart(resume_from=candidate)
            except ValueError as err:
                say(f"skipping {candidate.name}: {err}")
        if found:
            raise ValueError(f"no checkpoint in {out} can be resumed (see above): pass overwrite=true to start again")
    elif (out / METRICS_FILE).exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} holds an unfinished run: pass resume=auto to continue it or overwrite=true to "
                              "start again")
    return RunStart()


def check_run_start(cfg: RunConfig, out: Path, resolved_config: dict[str, Any],
                    say: Callable[[str], None]) -> RunStart:
    """Every check that needs no model but the run directory (locked by now), in order of cost; returns how the run
    starts."""
    check_output_dir(out)
    finished = check_finished_run(cfg, out, resolved_config)
    if finished is not None:
        return RunStart(finished_summary=finished)
    start = find_resume(cfg, out, say)
    if start.resume_from is not None:  # the settings of the run the checkpoint belongs to, this one's or another's
        start.config_changes = check_resume_config(checkpoint_run(start.resume_from) / CONFIG_FILE, resolved_config,
                                                   cfg.resume_allow_changes, is_checkpoint_of(start.resume_from, out))
        check_schedule_reaches(cfg, start.resume_from)
    check_model_files(cfg)
    adapted = check_model(cfg)
    if adapted is not None:
        check_disk_space(out, adapted, cfg.trainer.keep_checkpoints)
    return start
