"""A run directory: the names of its files, the one way kasa writes a file or folder atomically, finding a run's
checkpoint, and a run's saved config (with overrides, checked against the schema).

    <run>/config.json             the resolved config, with the command-line overrides (`hydra_overrides`)
    <run>/metrics.jsonl           per logging step and per evaluation, one JSON object a line
    <run>/regularization.jsonl    per logging step: each adapted module's L2 and L3 terms
    <run>/summary.json            written once, when the run finishes
    <run>/checkpoints/best/, last/, step-XXXXXXXX/   adapter checkpoints (kasa.training.checkpoint)
    <run>/evaluations/<checkpoint>-step-XXXXXXXX/<split>/   kasa-eval's outputs while it runs; they stay there
                                                   when a save replaced the checkpoint meanwhile, or judging failed

Light on purpose (no torch): kasa-compare, kasa-plot, the sweep summary and scripts/ read runs with it."""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from kasa.config import RunConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
REGULARIZATION_FILE = "regularization.jsonl"
SUMMARY_FILE = "summary.json"
TRACKERS_FILE = "trackers.json"  # the W&B and MLflow runs' ids, the TensorBoard log's folder: a resume continues them
TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"  # where those trackers write, unless WANDB_DIR is set
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINT, LAST_CHECKPOINT = "best", "last"  # checkpoints/<name>/: the best epoch's, and the newest
STEP_DIR = re.compile(r"^step-(\d+)$")  # checkpoints/step-XXXXXXXX/: resumable, by optimiser step (step_dir_name)
GENERATIONS_DIR = "generations"  # generation tasks' outputs: a run's in epoch-<N>/ per evaluation
EVALUATIONS_DIR = "evaluations"  # kasa-eval's outputs
# What kasa-plot and kasa-compare write into the folder they are given (a run's, by default), which a fresh start
# over the run (overwrite=true) removes: figures as <stem>.png with <stem>.json beside it (the stems of one run's
# figures end in their checkpoint or layer), the rank figure's table, and the comparison's files.
SINGULAR_VALUES_FIGURE, REGULARIZATION_FIGURE = "singular_values_", "regularization_layer"
ABLATION_FIGURE, RANK_FIGURE, TRUNCATION_FIGURE = "ablation", "rank", "truncation"
RANK_TABLE_FILE = "rank_table.md"
COMPARISON_FILES = {"markdown": "comparison.md", "csv": "comparison.csv", "latex": "comparison.tex"}
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # in every checkpoint directory
ADAPTER_CONFIG_FILE = "adapter_config.json"
STATE_FILE = "trainer_state.json"  # a checkpoint's training state (resumable ones: complete when present)
EXPORT_INFO_FILE = "kasa_export.json"  # in a kasa-export folder: what it was made from
LOCK_FILE = ".kasa.lock"  # held (flock) by the run writing the directory, or by a kasa-eval in evaluations/
# config.json holds the resolved settings and two records that are not settings: the command line's overrides, and
# the settings that resumes changed (resume_allow_changes=true)
OVERRIDES_KEY, RESUMED_WITH_CHANGES_KEY = "hydra_overrides", "resumed_with_changes"
SWEEP_JOBS_FILE = "sweep_jobs.json"  # scripts/sweep_launch.py's record of its jobs, in the sweep directory
SWEEP_RECORDS = ("multirun.yaml", SWEEP_JOBS_FILE)  # what marks a sweep directory (the first is Hydra's)
# the way out of a refused run directory, in every refusal (a sweep job's folder comes from hydra.sweep.dir)
CHOOSE_ANOTHER_RUN_DIR = ("choose another hydra.run.dir (hydra.sweep.dir for a --multirun sweep, --sweep-dir for "
                          "scripts/sweep_launch.py)")
HYDRA_DIR = ".hydra"  # Hydra's record of the command (config.yaml, hydra.yaml, overrides.yaml), written by kasa


def time_stamp() -> str:
    """The name of a default run, sweep or kasa-inspect folder (`runs/<task>/<method>/<time stamp>`): the local time
    to the microsecond, so that runs started in the same second (a shell loop of `kasa-train seed=$s &`, one per GPU)
    each get a folder of their own, still in the order they started."""
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


def sweep_record(folder: Path) -> Path | None:
    """The file that marks `folder` as a sweep's folder (its runs are the numbered subfolders), or None."""
    return next((folder / name for name in SWEEP_RECORDS if (folder / name).is_file()), None)


def follow_umask(path: Path) -> None:
    """Give a file, or every file under a folder, the permissions the umask gives new files, like every other file
    kasa writes: safetensors (and so transformers' and PEFT's save_pretrained) creates its files 0600."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    for file in (path.rglob("*") if path.is_dir() else [path]):
        if file.is_file():
            os.chmod(file, 0o666 & ~mask)


def write_atomically(path: str | Path, fill: Callable[[Path], None], directory: bool = False) -> Path:
    """Let `fill` write a temporary sibling of `path` (a file, or a fresh folder with `directory=True`), then rename
    it into place: readers never see half a file, and a kill leaves the previous version complete (and at worst a
    `.<name>.<pid>.tmp` beside it). The process id keeps concurrent writers (sweep jobs) apart; a failed write
    leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if directory and path.exists():  # a folder cannot be renamed over another: move the old one aside first
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        failed = _write_error(err, path.parent) if isinstance(err, Exception) and not isinstance(err, OSError) else None
        _remove(tmp)
        if failed:  # safetensors and torch.save report a failed write in errors of their own, without the path
            raise OSError(*failed, str(path)) from err
        if isinstance(err, OSError) and err.errno and (err.filename is None or str(err.filename).startswith(str(tmp))):
            raise OSError(err.errno, err.strerror, str(path)) from err  # name the file, not its temporary copy
        raise
    return path


# torch.save's writer, which names no error number: "file write failed", "unexpected pos 1206144 vs 1206032"
_TORCH_WRITE_FAILED = re.compile(r"file write failed|unexpected pos \d+|PytorchStreamWriter failed")


def _write_error(err: Exception, folder: Path) -> tuple[int, str] | None:
    """(error number, what it says) when a library's own error (not an OSError) is a failed write: said in its
    text (safetensors: "No space left on device (os error 28)", "File too large (os error 27)" under `ulimit -f`,
    after removing its partial file, so the disk no longer looks full), or not said (torch.save) and then a full
    disk when it is nearly full, its partial file still there, else an EIO of unknown cause. None for any other
    error."""
    text = str(err)
    said = next((code for code in (errno.ENOSPC, errno.EDQUOT) if os.strerror(code) in text), None)
    if said is None and (number := re.search(r"\(os error (\d+)\)", text)):
        said = int(number.group(1))
    if said is not None:
        return said, os.strerror(said)
    if not _TORCH_WRITE_FAILED.search(text):
        return None
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 64 * 1024:
            return errno.ENOSPC, os.strerror(errno.ENOSPC)
    return errno.EIO, "the write failed (torch.save does not say why: a full quota, a file size limit?)"


# write_atomically's temporary and moved-aside copies, and the staging folder of a DeepSpeed checkpoint
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)(\.(?P<pid>\d+))?\.(?P<kind>tmp|old|deepspeed)$")


def clean_partial_writes(run_dir: str | Path, remove: bool = True) -> list[Path]:
    """Remove what interrupted writes left in a run directory and its checkpoints folder (`write_atomically`'s
    `.<name>.<pid>.tmp`); a `.<name>.<pid>.old` whose `<name>` is missing goes back into place (the kill came
    between its two renames, and it is the complete previous version). `remove=False` only puts those back (before
    a run chooses the checkpoint to resume). Only while holding the run's lock: another live writer's temporary
    files look the same. Returns the paths removed."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS_DIR):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = _LEFTOVER.match(path.name)
            if match is None:
                continue
            if _put_back_or_remove(path, match, remove):
                removed.append(path)
    return removed


def clean_dead_writes(path: Path) -> list[Path]:
    """What killed processes' write_atomically left beside `path` (an output written without a run's lock:
    kasa-export's folder, up to a merged model's size), as clean_partial_writes does in a run directory; the
    copies of a process still running on this machine stay. Returns the paths removed."""
    removed = []
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        match = _LEFTOVER.match(leftover.name)
        if match is None or match["name"] != path.name or match["pid"] is None or _running(int(match["pid"])):
            continue
        if _put_back_or_remove(leftover, match):
            removed.append(leftover)
    return removed


def _put_back_or_remove(leftover: Path, match: re.Match, remove: bool = True) -> bool:
    """A moved-aside `.old` whose original is missing goes back into place (the kill came between write_atomically's
    two renames: it is the complete previous version); anything else is removed when `remove`. Whether it was."""
    target = leftover.with_name(match["name"])
    if match["kind"] == "old" and not target.exists():
        os.replace(leftover, target)
        return False
    if remove:
        _remove(leftover)
    return remove


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def resumable_checkpoints(run_dir: Path) -> list[Path]:
    """Complete resumable checkpoints of a run, oldest first. Here, not with the checkpoints' code, because it needs no
    torch: kasa-train asks it after a stop signal that may have cut torch's import short (which cannot run twice)."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def analysis_outputs(folder: Path) -> list[Path]:
    """The files of kasa-plot and kasa-compare in `folder` (see ABLATION_FIGURE): what a replaced run's analyses
    left."""
    figures = [f"{stem}*" for stem in (SINGULAR_VALUES_FIGURE, REGULARIZATION_FIGURE)]
    figures += [ABLATION_FIGURE, RANK_FIGURE, TRUNCATION_FIGURE]
    patterns = [f"{stem}.{suffix}" for stem in figures for suffix in ("png", "json")]
    return [path for pattern in (*patterns, RANK_TABLE_FILE, *COMPARISON_FILES.values())
            for path in sorted(folder.glob(pattern))]


def remove_if_empty(folder: str | Path) -> bool:
    """Remove `folder` if it holds nothing: what a refused start leaves (Hydra creates a run's folder before kasa
    reads its config). Whether it did."""
    try:
        Path(folder).rmdir()
    except OSError:  # not empty (another process may have started in it), gone, or the working directory
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def finite_numbers(data: Any) -> Any:
    """`data` with every nan or infinite float (an undefined metric) as None, which JSON files can hold."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_numbers(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_numbers(value) for value in data]
    return data


def output_folder(path: str | Path, create: bool = True) -> Path:
    """The folder that an analysis command (kasa-compare, kasa-plot: --out) writes into, created when missing
    (`create=False`: only checked, before the work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder: pass a folder (it is created when missing)")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_can_make(path: str | Path, option: str) -> None:
    """`option` (the argument, e.g. `output=x`) names a folder that can be made, or written into, at `path`: the
    nearest of it and its parents that exists is a writable folder. Said before the model loads or the work starts
    rather than after it, and nothing is left behind (bad input leaves no folder). The test makes and removes a
    folder there: permission bits say nothing for root, nor for /proc or a file system mounted read-only."""
    path = Path(path).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} cannot be made: {existing} is a file, not a folder; choose another")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kasa-write-test-", dir=existing))
    except OSError as err:
        raise ValueError(f"{option} cannot be made: {existing} is not writable ({err.strerror}); choose another") \
            from None


VERSIONED_PACKAGES = ("kasa", "torch", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed")


def software_versions() -> dict[str, str | None]:
    """Python's and the installed versions of the packages a run's numbers depend on (None: not installed), as a
    run's summary and an export record them: what a result was computed with."""
    import platform
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{package: version(package) for package in VERSIONED_PACKAGES}}


def write_json(path: str | Path, data: Any) -> Path:
    """JSON, indented, written atomically."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def find_checkpoint(path: str | Path, which: str | None = None) -> tuple[Path, Path]:
    """(checkpoint directory, run directory) for a run directory or a checkpoint directory. In a run directory
    `which` picks the checkpoint (best, the default, or last); without `which`, a run without `best` falls back to
    `last` (a run with trainer.save_best=false has none), and `which=best` asked for is refused there. A checkpoint
    directory outside a run is its own run directory; `which` given with a checkpoint directory is an error, since it
    would be ignored."""
    if which is not None and which not in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        raise ValueError(f"which={which!r} names no checkpoint: choose {BEST_CHECKPOINT} or {LAST_CHECKPOINT}, or pass "
                         "a checkpoint directory (e.g. checkpoints/step-00000100) as checkpoint=")
    path = Path(path)
    if (path / EXPORT_INFO_FILE).is_file():  # a PEFT export holds kasa's adapter file names too
        source = json.loads((path / EXPORT_INFO_FILE).read_text(encoding="utf-8")).get("checkpoint")
        raise ValueError(f"{path} is a kasa-export folder, not a checkpoint: pass the checkpoint it was made from"
                         f"{f' ({source})' if source else ''}, or load the export with the line in {EXPORT_INFO_FILE}")
    if (path / ADAPTER_WEIGHTS_FILE).is_file():
        if which is not None:
            raise ValueError(f"which={which} picks a checkpoint inside a run directory, but {path} is a checkpoint "
                             f"directory itself: drop which=, or pass its run directory")
        return path, (path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path)
    names = [which] if which is not None else [BEST_CHECKPOINT, LAST_CHECKPOINT]
    for name in names:
        if (path / CHECKPOINTS_DIR / name / ADAPTER_WEIGHTS_FILE).is_file():
            return path / CHECKPOINTS_DIR / name, path
    if which == BEST_CHECKPOINT and (path / CHECKPOINTS_DIR / LAST_CHECKPOINT / ADAPTER_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {BEST_CHECKPOINT}/ checkpoint (trained with trainer.save_best=false, "
                                f"or its best epoch is in the run it was continued from): pass which={LAST_CHECKPOINT}")
    steps = sorted(d for d in (path / CHECKPOINTS_DIR).glob("step-*") if STEP_DIR.match(d.name)
                   and (d / ADAPTER_WEIGHTS_FILE).is_file())
    if steps:  # a run stopped before its first evaluation (or whose evaluation failed) has only resumable ones
        missing = " or ".join(f"{name}/" for name in names)
        raise FileNotFoundError(f"{path} has no {missing} checkpoint (it has not finished an evaluation): pass one of "
                                f"its step checkpoints, e.g. the newest, {steps[-1]}")
    raise FileNotFoundError(f"no checkpoint at {path}: pass a run directory (with {CHECKPOINTS_DIR}/{names[0]}/) or a "
                            f"checkpoint directory holding {ADAPTER_WEIGHTS_FILE}")


def step_dir_name(step: int) -> str:
    """The folder name of the resumable checkpoint written at optimiser step `step`."""
    return f"step-{step:08d}"


def checkpoint_version(checkpoint: Path) -> tuple[int, ...] | None:
    """What tells one save of a checkpoint directory from the next (a live training run replaces best/ and last/ by
    renaming a new folder into place, and prunes old step-* ones): the folder's inode, and the size and modification
    time of its weights and its state ((-1, -1) for one it lacks). None once the folder is gone."""
    try:
        version = [os.stat(checkpoint).st_ino]
    except FileNotFoundError:
        return None
    for name in (ADAPTER_WEIGHTS_FILE, STATE_FILE):
        try:
            stat = os.stat(checkpoint / name)
            version += [stat.st_size, stat.st_mtime_ns]
        except FileNotFoundError:
            version += [-1, -1]
    return tuple(version)


def run_record(folder: Path) -> Path | None:
    """The first of a run's records that `folder` holds (kasa-train writes config.json and .hydra/ as it starts), or
    None: the run counterpart of `sweep_record`."""
    return next((folder / name for name in (SUMMARY_FILE, CONFIG_FILE, HYDRA_DIR, METRICS_FILE, CHECKPOINTS_DIR)
                 if (folder / name).exists()), None)


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` is one run's own folder (`run_record`): its subfolders are its files (checkpoints/,
    evaluations/), not other runs."""
    return run_record(folder) is not None


def checkpoint_run(checkpoint: Path) -> Path:
    """The run folder a checkpoint was written in (<run>/checkpoints/<name>/)."""
    return checkpoint.resolve().parent.parent


def is_checkpoint_of(checkpoint: Path, run_dir: Path) -> bool:
    """Whether `checkpoint` is one of the run's own (checkpoints/<name>/), not another run's (`resume=<path>`),
    however either path is written (relative, through a link)."""
    return checkpoint_run(checkpoint) == run_dir.resolve()


def check_checkpoint_unchanged(checkpoint: Path, version: tuple[int, ...] | None, while_doing: str) -> None:
    """Refuse what was read from `checkpoint` if a save replaced or removed it meanwhile: its files could come from
    two different saves."""
    if version is None or checkpoint_version(checkpoint) != version:
        raise ValueError(f"{checkpoint} was replaced or removed (by the training run writing it) while {while_doing}: "
                         "run the command again, or pass a step checkpoint that the run keeps "
                         f"({CHECKPOINTS_DIR}/step-XXXXXXXX)")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.json as saved ({} when absent or unreadable: for tables that show what they can)."""
    try:
        data = json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run's saved config with dotted `key=value` overrides (e.g. model.path=...), checked against the schema:
    what kasa-eval and kasa-export rebuild a run's model and task from."""
    from omegaconf import OmegaConf

    from kasa.config import validate

    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: the checkpoint must sit in a kasa run directory")
    saved = json.loads(config_file.read_text())
    for record in (OVERRIDES_KEY, RESUMED_WITH_CHANGES_KEY):
        saved.pop(record, None)
    logging = saved.get("logging")
    if isinstance(logging, dict) and "tensorboard" in logging:  # saved before logging.trackers replaced the flag
        logging["trackers"] = ["tensorboard"] if logging.pop("tensorboard") else []
    for override in overrides or []:
        key, _, value = override.partition("=")
        node: Any = saved
        for part in key.lstrip("+").split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):  # `model=roberta_base`: a config group, which only kasa-train composes
            example = f" (e.g. {key}.{next(iter(node))}=...)" if node else ""
            raise ValueError(f"{override} would replace the saved run's whole {key} settings, and a saved run's config "
                             f"groups cannot be swapped: override single settings instead{example}, or train a run "
                             f"with {key}={value}")
    # Read as kasa-train's Hydra reads them (YAML would make `trainer.precision=no` the boolean False)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config = OmegaConf.create(saved)
    for override in OverridesParser.create().parse_overrides(list(overrides or [])):
        if override.is_delete() or override.is_sweep_override():
            raise ValueError(f"{override.input_line}: a saved run's settings can be set here, one value each, not "
                             "removed or swept")
        OmegaConf.update(config, override.key_or_group, override.value(), merge=False, force_add=True)
    return validate(config)
