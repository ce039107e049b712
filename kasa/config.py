"""Typed schema of a run's configuration. Registered with Hydra's ConfigStore (`register_schema`), it is the root
that the YAML groups under configs/ (model, task, method, trainer, logging) and a recipe merge into, so each file
holds only what differs from these defaults and an unknown key or a wrong type fails at composition; `validate`
then checks the values before anything runs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from kasa.adapters.config import AdapterConfig


MODEL_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype: torch dtypes of these names (kasa.tasks.models)
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
JUDGE_CONNECTION_SETTINGS = ("task.judge.base_url", "task.judge.api_key_env", "task.judge.max_retries",
                             "task.judge.timeout", "task.judge.concurrency")
"""Where and how the LLM judge is asked; the judge itself is task.judge.model."""
BOOKKEEPING_SETTINGS = ("resume", "overwrite", "resume_allow_changes", "output_dir", "logging", "trainer.save_every",
                        "trainer.keep_checkpoints", "trainer.allow_cpu", "method.svd_cache_dir",
                        "method.calibration_memory_gib", *JUDGE_CONNECTION_SETTINGS)
"""Settings (and everything under them) that do not change what a run computes: where it lives, how it starts, how
often it saves, the progress display, the decomposition cache, the memory bound of the calibration pass (which
groups the modules, each one's moments summed alike: bit for bit the same), where and how the judge is asked. A run
resumes with other values of them, and a sweep's summary and kasa-compare never tell runs apart by them."""


TRAINING_ONLY_SETTINGS = ("output_dir", "resume", "overwrite", "resume_allow_changes", "recipe", "logging.trackers",
                          "trainer.epochs", "trainer.batch_size", "trainer.grad_accum", "trainer.lr",
                          "trainer.head_lr", "trainer.weight_decay", "trainer.scheduler", "trainer.warmup_ratio",
                          "trainer.warmup_steps", "trainer.max_steps", "trainer.max_grad_norm", "trainer.log_every",
                          "trainer.evaluate_every_epoch", "trainer.save_every", "trainer.keep_checkpoints",
                          "trainer.save_best", "trainer.group_by_length", "trainer.packing", "trainer.compile",
                          "trainer.label_smoothing", "task.train_on_inputs", "task.train_split",
                          "task.max_train_samples")
"""Settings that only training reads (where a run lives and starts, the optimisation, the schedule of saves and
logs): kasa-eval and kasa-export, which read a saved checkpoint, refuse them as overrides that would change nothing."""


def is_bookkeeping(key: str) -> bool:
    """Whether a dotted config key is one of BOOKKEEPING_SETTINGS or under one."""
    return is_under(key, BOOKKEEPING_SETTINGS)


def is_training_only(key: str) -> bool:
    """Whether a dotted config key is one of TRAINING_ONLY_SETTINGS or under one."""
    return is_under(key, TRAINING_ONLY_SETTINGS)


def is_under(key: str, settings: tuple[str, ...]) -> bool:
    """Whether a dotted config key is one of `settings` or under one (trainer.lr is under trainer)."""
    return any(key == setting or key.startswith(f"{setting}.") for setting in settings)


def dotted_settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved config as {dotted key: value} (trainer.lr, method.target_modules); an empty section is a value, and
    what is not a mapping at all (a config.json damaged into a list) has no settings."""
    flat: dict[str, Any] = {}
    for name, value in (config.items() if isinstance(config, dict) else ()):
        if isinstance(value, dict) and value:
            flat |= dotted_settings(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


@dataclass
class ModelConfig:
    name: str = "???"  # Hub id, e.g. roberta-base
    path: Optional[str] = None  # local folder; used instead of `name` when set
    gguf_file: Optional[str] = None  # file name inside `path` for GGUF checkpoints
    dtype: str = "float32"  # float32 | bfloat16 | float16: dtype the weights are loaded in
    target_modules: list[str] = field(default_factory=list)
    head_modules: list[str] = field(default_factory=list)  # trained fully (classifier heads)
    fused_modules: dict[str, list[str]] = field(default_factory=dict)
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    quantization: Optional[str] = None  # null | nf4 | int8: the frozen base through bitsandbytes (QLoRA-style)
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (CUDA, flash-attn) | eager

    def __post_init__(self) -> None:  # names checked at composition, not when the model loads after the data
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"unknown model.dtype {self.dtype!r}; choose one of {', '.join(MODEL_DTYPES)}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown model.attn_implementation {self.attn_implementation!r}; choose one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")


@dataclass
class GenerationSettings:
    """Decoding for generation tasks (transformers' generate arguments)."""

    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1  # responses per prompt (instruction following judges each)
    batch_size: int = 8


@dataclass
class JudgeSettings:
    """An OpenAI-compatible chat-completions endpoint that scores responses 1-10 (paper figure 7). The API key is
    read from the environment variable named by api_key_env, never from a config file."""

    base_url: Optional[str] = None
    model: str = "gpt-4o"
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    max_retries: int = 5
    timeout: float = 60.0
    concurrency: int = 4  # requests in flight at once: the GPUs wait for the judge, a request takes seconds


TASK_KIND_NAMES = ("glue", "e2e", "instruction", "commonsense")  # kasa.tasks.TASK_KINDS implements each


@dataclass
class TaskConfig:
    name: str = "???"
    kind: str = "glue"  # one of TASK_KIND_NAMES
    hub_id: Optional[str] = None  # datasets Hub id, e.g. nyu-mll/glue
    hub_config: Optional[str] = None  # its configuration, e.g. cola
    data_dir: Optional[str] = None  # local files; used instead of the Hub when set
    train_split: str = "train"
    eval_split: str = "validation"
    text_fields: list[str] = field(default_factory=lambda: ["sentence"])
    label_field: str = "label"
    num_labels: int = 2  # 1 = regression
    metric: str = "accuracy"  # the metric that picks the best epoch
    # at most this many examples of a split: GLUE a fixed shuffled sample, the generation tasks their first ones
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    eval_sets: list[str] = field(default_factory=list)  # commonsense: test sets, <data_dir>/<set>/test.json
    prompt_style: str = "clean"  # commonsense: clean (Alpaca template) | llm_adapters (LLM-Adapters' exact bytes)
    # generation tasks: the loss on the prompt's tokens too, not only the response's (LLM-Adapters' finetune.py default)
    train_on_inputs: bool = False
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)

    def __post_init__(self) -> None:
        from kasa.data.prompts import PROMPT_STYLES

        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown task.prompt_style {self.prompt_style!r}; choose one of: "
                             f"{', '.join(PROMPT_STYLES)}")


@dataclass
class TrainerConfig:
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 4e-4
    head_lr: Optional[float] = None  # learning rate of the fully trained head (null: same as lr)
    weight_decay: float = 0.0
    scheduler: str = "linear"  # linear | cosine | constant, each after the warmup (kasa.training.schedule)
    warmup_ratio: float = 0.06
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    max_length: int = 512
    max_steps: Optional[int] = None  # stop after this many optimiser steps (quick runs)
    max_grad_norm: Optional[float] = None
    label_smoothing: float = 0.0
    precision: str = "no"  # no | fp16 | bf16
    log_every: int = 10
    evaluate_every_epoch: bool = True  # false: evaluate once, after the last epoch (generation tasks)
    save_every: Optional[int] = None  # also write a resumable checkpoint every N optimiser steps
    keep_checkpoints: int = 2  # resumable checkpoints kept (the newest N), besides best/ and last/
    save_best: bool = True
    packing: bool = False  # causal LMs: several examples per row of max_length, attention kept within each
    group_by_length: bool = False  # batches of similar lengths (the alternative to packing)
    compile: bool = False  # torch.compile the model
    allow_cpu: bool = False  # proceed without a GPU even with a model of more than 500M parameters


@dataclass
class LoggingConfig:
    trackers: list[str] = field(default_factory=list)  # any of tensorboard, wandb, mlflow (Accelerate trackers)
    progress: bool = True  # rich progress bars


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    output_dir: str = "???"
    resume: Optional[str] = None  # auto: continue from the newest complete checkpoint of output_dir; or a path
    overwrite: bool = False  # allow an output_dir that already holds a finished run (its files are replaced)
    resume_allow_changes: bool = False  # resume with settings that differ from the run's own (recorded)
    recipe: Any = None  # the chosen recipe's name, recorded for the run summary

    def __post_init__(self) -> None:
        if self.model.quantization is not None:  # (that module imports torch: ~2 s that no other config needs)
            from kasa.adapters.quantized import check_quantization  # a method that cannot run quantized fails here

            check_quantization(self.model.quantization, self.method.method)


SCHEMA_NAME = "run_schema"  # the first entry of configs/config.yaml's defaults
# method.<key> is not a setting of its own: the adapted and fully trained modules belong to the model (model.<source>)
MODEL_MODULES = {"target_modules": "target_modules", "trainable_modules": "head_modules",
                 "fused_modules": "fused_modules"}


def run_schema() -> type:
    """The typed schema that composition checks: RunConfig with the method's module keys left out (they follow the
    model, so `method.target_modules=...` is an unknown key; `model_module_error` says what to write instead)."""
    method = _dataclass_without(AdapterConfig, "MethodSettings", set(MODEL_MODULES))
    # output_dir is Hydra's run directory, which `--cfg job --resolve` prints before there is one (null)
    return _dataclass_without(RunConfig, "RunSchema", set(), replace={"method": method, "output_dir": Optional[str]})


def follows_the_model(key: str) -> bool:
    """Whether a dotted key is the method's copy of a model setting (method.target_modules from
    model.target_modules): an override sets the model's, and composition refuses the copy's (model_module_error)."""
    section, _, name = key.partition(".")
    return section == "method" and name in MODEL_MODULES


def model_module_error(key: str) -> str:
    """The message for `method.<key>` where key is one of MODEL_MODULES."""
    return f"method.{key} follows the model: set model.{MODEL_MODULES[key]}=... instead"


def register_schema() -> None:
    """Register `run_schema()` with Hydra's ConfigStore: every group file and recipe then merges into it, so a file
    holds only what differs from these defaults and a misspelt key fails at composition."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=run_schema())


def _dataclass_without(cls: type, name: str, drop: set[str], replace: dict[str, type] | None = None) -> type:
    """A copy of dataclass `cls` without the fields in `drop`, with the types of `replace`'s fields swapped."""
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        if f.name in (replace or {}) and dataclasses.is_dataclass(replace[f.name]):
            specs.append((f.name, replace[f.name], field(default_factory=replace[f.name])))
        elif f.name in (replace or {}):
            specs.append((f.name, replace[f.name], field(default=f.default)))
        elif f.default is not dataclasses.MISSING:
            specs.append((f.name, f.type, field(default=f.default)))
        else:
            specs.append((f.name, f.type, field(default_factory=f.default_factory)))
    made = dataclasses.make_dataclass(name, specs)
    made.__module__ = cls.__module__  # the string annotations resolve in the original's module
    return made


def resolve(cfg: Any) -> dict[str, Any]:
    """A composed config (DictConfig) or a saved one (dict) as plain data, Hydra's own node dropped and the method's
    modules taken from the model, where they are set."""
    import copy

    from omegaconf import OmegaConf

    data = copy.deepcopy(cfg) if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    model, method = data.get("model") or {}, data.setdefault("method", {})
    default = AdapterConfig()
    for key, source in MODEL_MODULES.items():
        if key in method and method[key] not in (getattr(default, key), model.get(source)):
            raise ValueError(model_module_error(key))
        method[key] = model.get(source, getattr(default, key))
    return data


def validate(cfg: Any) -> RunConfig:
    """Check a composed or saved config against RunConfig before any work: unknown keys, wrong types and values,
    a metric that the task does not compute, a setting that the task ignores."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    data = resolve(cfg)
    # OmegaConf's marker of a missing value, given by the user (trainer.lr=???), survives resolving as a string, and
    # the merge below would take the schema's default in its place: say it, as for the settings with no default
    for key, value in dotted_settings(data).items():
        if value == "???":
            missing = MissingMandatoryValue(f"Missing mandatory value: {key}")
            missing.full_key = key
            raise missing
    try:
        run = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except ValueError as err:  # AdapterConfig's own checks name its fields (beta, rank): in a run they are method.*
        if str(err).split(" ", 1)[0] in {f.name for f in dataclasses.fields(AdapterConfig)}:
            raise ValueError(f"method.{err}") from err
        raise
    _check_task(run)
    return run


def _check_task(run: RunConfig) -> None:
    from kasa.evaluation.metrics import task_metrics

    task = run.task
    if task.kind not in TASK_KIND_NAMES:
        raise ValueError(f"unknown task.kind {task.kind!r}; choose one of: {', '.join(TASK_KIND_NAMES)}")
    computed = task_metrics(task.kind, task.num_labels, task.eval_sets)
    # (a num_labels below 1 computes nothing: check_config_values refuses it, naming it, not the metric)
    if task.metric not in computed and task.num_labels >= 1:
        raise ValueError(f"task.metric={task.metric} is not computed by a {task.kind} task"
                         f"{' with num_labels ' + str(task.num_labels) if task.kind == 'glue' else ''}: choose one "
                         f"of {', '.join(computed)}")
    if task.kind != "glue" and run.trainer.eval_batch_size != TrainerConfig.eval_batch_size:
        raise ValueError(f"trainer.eval_batch_size batches the evaluation of classification tasks; a {task.kind} "
                         "task generates in batches of task.generation.batch_size: set that instead")
    if task.kind == "glue" and run.trainer.packing:
        raise ValueError("trainer.packing packs the examples of the generation tasks (e2e, instruction, "
                         "commonsense); a classification task keeps one example per row: use "
                         "trainer.group_by_length=true to avoid padding")
    if run.trainer.packing and run.trainer.group_by_length:
        raise ValueError("trainer.packing and trainer.group_by_length are two ways to avoid padding: set one")


def launch_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) as a multi-process launcher (accelerate launch, torchrun) set
    them in the environment; (0, 1) for a process of its own. Read where no Accelerator exists yet (or any more)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
