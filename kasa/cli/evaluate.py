"""kasa-eval: re-evaluate a saved checkpoint on a task split and report the metric the training run reported.

    kasa-eval checkpoint=runs/cola/kasa/2026-11-22_10-00-00_123456     the run's best checkpoint, validation split
    kasa-eval checkpoint=runs/.../checkpoints/last split=test task.data_dir=../shared/data/sst2
    kasa-eval checkpoint=... merge=true                                 merge the adapter into the weights first

Arguments are key=value: `checkpoint` (a run directory or a checkpoint directory), `which` (best | last, for a run
directory; when not given, best, or last in a run without best), `split` (default: the run's evaluation split),
`merge` (true | false: evaluate the merged model that `kasa-export format=merged` writes; a quantized base is
dequantized to its compute dtype first, as there, and refused at once where that would not fit the GPU), `batch_size`
(the evaluation batch: trainer.eval_batch_size of a classification task, task.generation.batch_size of a generation
task), and any dotted override of the run's saved config (model.path=..., task.data_dir=...; not the method's settings
nor model.target_modules: the adapter is rebuilt as it was trained). Prints the score the training run reported for
the checkpoint only when it evaluates the split the training run evaluated it on. Writes eval_<split>.json (a split
given as a file's path: its folders and name joined by '-', without the file's ending; `merge` records whether the
adapter was merged), and a generation task's outputs under generations/, into the checkpoint directory. They are
written first to <run>/evaluations/<checkpoint>-step-XXXXXXXX/<split>/, and stay there when the training run saved
over the checkpoint while it was evaluated (best/ and last/ of a run still training), or when judging fails (run
again, kasa-eval reuses the responses and the scores saved there). One kasa-eval of a checkpoint on a split runs at a
time (a second one stops with the first one's pid); other splits run beside it. An override that changes what is
measured (eval sets, sample counts, decoding, the judge's model, trainer.max_length, model.dtype, any setting but
model.path, task.data_dir, the split, the batch sizes, and where and how the judge is asked) makes another evaluation:
it reports no training score, and its outputs stay in <run>/evaluations/<checkpoint>-step-XXXXXXXX/<split>-<hash>/
(eval_<split>.json records them as `overrides`), never over the checkpoint's own. So does other data (a
task.data_dir of other files): the examples' fingerprint differs from the one the training run recorded with its
score (a step checkpoint: with the checkpoint, for the run's evaluation split). An override equal to the run's own
value, or of where and how it runs (logging.progress, trainer.allow_cpu), changes nothing; one that only training
reads (output_dir, resume, recipe, trainer.lr, logging.trackers, ...) is refused. Each split, the training split too, is cut to task.max_eval_samples (GLUE: a fixed shuffled sample; the
generation tasks: the first examples; null: all of it); it runs under the run's trainer.precision, and sampled
decoding draws from the run's seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kasa.cli.common import (
    bool_argument,
    key_value_arguments,
    load_saved_config,
    override_key,
    run_reporting_errors,
)
from kasa.config import JUDGE_CONNECTION_SETTINGS, dotted_settings, is_bookkeeping, launch_rank
from kasa.data.sources import split_label
from kasa.run_dir import (
    EVALUATIONS_DIR,
    GENERATIONS_DIR,
    LOCK_FILE,
    STATE_FILE,
    STEP_DIR,
    check_checkpoint_unchanged,
    checkpoint_version,
    find_checkpoint,
    read_config,
    remove_if_empty,
    step_dir_name,
    write_atomically,
    write_json,
)
from kasa.training.run_lock import RunLock

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kasa.tasks import Task

OWN_KEYS = ("checkpoint", "which", "split", "merge", "batch_size")
# Overrides that keep an evaluation the checkpoint's own: where the base model and the data lie, the split (which
# names the evaluation already), the evaluation and generation batches, and where and how the judge (the same judge
# model) is asked. Any other (task, trainer, model or method settings) changes what is measured.
NEUTRAL_OVERRIDES = ("model.path=", "task.data_dir=", "task.eval_split=", "trainer.eval_batch_size=",
                     "task.generation.batch_size=", *(f"{key}=" for key in JUDGE_CONNECTION_SETTINGS))


def evaluate_checkpoint(args: dict[str, Any]) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from kasa.tasks import build_task
    from kasa.training.preflight import ignored_precision_warning

    merge = bool_argument(args, "merge", False)  # the arguments before anything loads
    if "batch_size" in args and not (args["batch_size"].isdigit() and int(args["batch_size"]) >= 1):
        raise ValueError(f"batch_size={args['batch_size']!r} is not allowed: pass a whole number >= 1")
    checkpoint, run_dir = find_checkpoint(Path(str(args["checkpoint"])), args.get("which"))
    overrides = [f"{k}={v}" for k, v in args.items() if k not in OWN_KEYS]
    if "batch_size" in args:  # classification evaluates in batches of its own; generation tasks generate in batches
        kind = read_config(run_dir).get("task", {}).get("kind", "glue")
        key = "trainer.eval_batch_size" if kind == "glue" else "task.generation.batch_size"
        overrides.append(f"{key}={args['batch_size']}")
    run_cfg = load_saved_config(run_dir, overrides, "kasa-eval measures (its outputs go beside the checkpoint and "
                                "under <run>/evaluations/)", own_keys=OWN_KEYS)
    if merge and launch_rank()[0] == 0:
        from kasa.adapters.quantized import merge_note

        if note := merge_note(run_cfg.model.quantization):
            print(note, file=sys.stderr)
    split = str(args.get("split") or run_cfg.task.eval_split)
    for folder in (checkpoint, run_dir):  # before the model loads, not after the evaluation
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{folder} is not writable, and kasa-eval writes its outputs there: evaluate a writable "
                             f"copy of the run (cp -r {run_dir} <folder>)")

    # the training run's mixed precision: its evaluations ran under that autocast, so the same scores come back
    accelerator = Accelerator(mixed_precision=run_cfg.trainer.precision)
    if launch_rank()[0] == 0 and (ignored := ignored_precision_warning(run_cfg.trainer.precision,
                                                                        accelerator.device.type)):
        print(ignored, file=sys.stderr)
    set_seed(run_cfg.seed)  # sampled decoding draws from it: the same command generates the same outputs
    task = build_task(run_cfg)
    fingerprint = task.check_evaluation(split)  # a split= typo fails before the model loads
    version = checkpoint_version(checkpoint)  # a run still training may save over it while it is evaluated
    state_file = checkpoint / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    # An evaluation on other settings (eval sets, sample counts, decoding, max_length, dtype) measures something else
    # than the training run did: it reports no training score, and its outputs keep a folder of their own under
    # evaluations/ instead of replacing the checkpoint's own eval_<split>.json.
    saved = dotted_settings(dataclasses.asdict(load_saved_config(run_dir, [])))
    resolved = dotted_settings(dataclasses.asdict(run_cfg))
    changed = sorted(o for o in overrides if not o.startswith(NEUTRAL_OVERRIDES)  # a value the run had is no change
                     and not is_bookkeeping(override_key(o))  # logging.progress, trainer.allow_cpu: the same scores
                     and resolved.get(override_key(o)) != saved.get(override_key(o)))
    in_training = score_in_training(run_dir, state, task.metric)
    # what the training run evaluated (best/, last/) or would evaluate (a step checkpoint) on that split: other files
    # in task.data_dir, or edited ones, are another evaluation (checkpoints from before it was recorded: not compared)
    trained_on = state.get("eval_data")
    if split == state.get("split", state.get("eval_split")) and trained_on not in (None, fingerprint):
        changed.append(f"evaluated data {fingerprint[:12]} (the training run's: {trained_on[:12]})")
    reported = in_training[1] if in_training and not changed and split == in_training[0] else None
    name = split_label(split)  # a split given as a file's path names a file here, not a path
    label = f"{name}-{hashlib.sha256(' '.join(changed).encode()).hexdigest()[:8]}" if changed else name
    # The outputs are written where a save cannot replace them, and copied beside the weights at the end. Judging
    # that fails leaves the responses there. One kasa-eval of a checkpoint's split at a time: two would mix their
    # outputs (other decoding settings, say) in that folder.
    step = state.get("step")
    staged = evaluation_folder(checkpoint, run_dir, step if isinstance(step, int) else None, label)
    lock = RunLock(staged, "kasa-eval of this checkpoint on this split",
                   f"evaluate a copy of the run (cp -r {run_dir} <folder>)")
    if accelerator.is_main_process:
        lock.acquire()
    try:
        return evaluate_staged(task, accelerator, checkpoint, version, reported, split, staged, merge, changed,
                               run_cfg.task.max_eval_samples, fingerprint)
    finally:
        lock.release(discard_empty=True)
        for folder in (staged.parent, staged.parent.parent):  # evaluations/<checkpoint>/ and evaluations/
            remove_if_empty(folder)


def score_in_training(run_dir: Path, state: dict[str, Any], metric: str) -> tuple[str, float] | None:
    """The split the training run evaluated the checkpoint with this state on, and the score it reported: best/ and
    last/ record them (the split, in checkpoints saved before it was recorded, is the run's saved task.eval_split,
    kasa-eval's own overrides aside); a step checkpoint saved after an evaluation at its own step holds that
    evaluation, the last of its history. None for a checkpoint that was not evaluated as it is."""
    if "score" in state:
        return state.get("split") or read_config(run_dir).get("task", {}).get("eval_split"), state["score"]
    history = state.get("history") or []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    evaluated_here = state.get("step") is not None and last.get("step") == state["step"]
    if evaluated_here and isinstance(last.get(metric), (int, float)):
        return last.get("split") or state.get("eval_split"), last[metric]
    return None


def evaluate_staged(task: Task, accelerator: Accelerator, checkpoint: Path, version: tuple[int, ...] | None,
                    reported: float | None, split: str, staged: Path, merge: bool,
                    changed: list[str], max_eval_samples: int | None, fingerprint: str) -> dict[str, Any]:
    """Load, evaluate into `staged`, and place the outputs (place_outputs), unless `changed` (the overrides that
    change what is measured, and other evaluated data) keeps them in `staged`. `reported`: the training run's score
    for the checkpoint on this split, if it evaluated it there with these settings."""
    from kasa.adapters import dequantize_base, load_adapter, merge_adapters
    from kasa.adapters.quantized import check_room_to_dequantize
    from kasa.tasks.models import stop_buffer_broadcast
    from kasa.evaluation.metrics import main_metric

    tokenizer, model = task.load_model()
    load_adapter(model, checkpoint)
    check_checkpoint_unchanged(checkpoint, version, "kasa-eval read it")
    if merge:  # a 4/8-bit weight cannot hold the update: merge as kasa-export format=merged does, in float
        check_room_to_dequantize(model, "merge=true", "evaluate without merge=true (the adapter over the quantized "
                                 "base, as trained), or write the merged model with kasa-export format=merged (in CPU "
                                 "memory) and evaluate that on a larger GPU")
        dequantize_base(model)
        merge_adapters(model)
    model = accelerator.prepare(model)
    stop_buffer_broadcast(model)
    metrics = task.evaluate(model, accelerator, tokenizer, split, staged / GENERATIONS_DIR)
    result = {
        "checkpoint": str(checkpoint),
        "split": split,
        "metric": task.metric,
        "score": main_metric(metrics, task.metric),
        "metrics": metrics,
        "merge": merge,  # eval_<split>.json of a merged model replaces the unmerged one's: it says which it holds
        "overrides": changed,
        "max_eval_samples": max_eval_samples,  # each evaluated set cut to this many rows at most (null: all)
        "eval_data": fingerprint,  # sha256 of the evaluated examples, as the training run records with its scores
    }
    if reported is not None:
        result["reported_in_training"] = reported
    if accelerator.is_main_process:
        result_name = f"eval_{split_label(split)}.json"
        if changed:
            write_json(staged / result_name, result)
            result["output_dir"] = str(staged)
        else:
            result["output_dir"] = str(place_outputs(checkpoint, version, staged, result_name, result))
    return result


def evaluation_folder(checkpoint: Path, run_dir: Path, step: int | None, split: str) -> Path:
    """<run>/evaluations/<checkpoint>-step-XXXXXXXX/<split>/ (a step checkpoint: its own name): no training run
    replaces or prunes it, and evaluations of other splits running at the same time have folders of their own."""
    label = checkpoint.name
    if step is not None and not STEP_DIR.match(label):  # best/ and last/: which of their saves
        label += f"-{step_dir_name(step)}"
    return run_dir / EVALUATIONS_DIR / label / split


def place_outputs(checkpoint: Path, version: tuple[int, ...] | None, staged: Path, result_name: str,
                  result: dict[str, Any]) -> Path:
    """Write the result, and copy the generation outputs staged in `staged`, into the checkpoint directory if it is
    still the save that was evaluated (the staged copies then go); else (a save replaced it) keep all of it in
    `staged`, saying so. Returns the folder that holds the outputs."""
    names = [path.relative_to(staged) for path in sorted(staged.rglob("*"))
             if path.is_file() and path.name != LOCK_FILE]
    if checkpoint_version(checkpoint) == version:
        for name in names:
            (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(checkpoint / name, lambda tmp, source=staged / name: shutil.copyfile(source, tmp))
        write_json(checkpoint / result_name, result)  # last: its presence says the outputs are complete
        if checkpoint_version(checkpoint) == version:
            _remove_staged(staged, names)
            return checkpoint
        for name in [*names, Path(result_name)]:  # the save came between: what landed in the new folder is not its
            (checkpoint / name).unlink(missing_ok=True)
    staged.mkdir(parents=True, exist_ok=True)
    write_json(staged / result_name, result)
    print(f"warning: {checkpoint} was saved over while kasa-eval evaluated it (the training run is still writing "
          f"it): the outputs for the checkpoint evaluated are in {staged}", file=sys.stderr)
    return staged


def _remove_staged(staged: Path, names: list[Path]) -> None:
    """The staged copies, then the folders they leave empty (another split's evaluation may be staging beside it;
    a folder that holds kasa-eval's lock goes when the lock is released)."""
    for name in names:
        (staged / name).unlink(missing_ok=True)
    folders = {(staged / name).parent for name in names} | {staged, staged.parent, staged.parent.parent}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):  # the deepest first
        remove_if_empty(folder)


def main(argv: list[str] | None = None) -> None:
    args = key_value_arguments(argv, __doc__, ("checkpoint",), "kasa-eval checkpoint=runs/<run dir>")
    result = run_reporting_errors(lambda: evaluate_checkpoint(args), OWN_KEYS, output_option="")
    if launch_rank()[0] != 0:  # under `accelerate launch`: the result once, not once per process
        return
    print(f"{result['split']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    if result["max_eval_samples"] is not None:
        limit = result["max_eval_samples"]
        print(f"(on {limit} examples at most of each evaluated set, task.max_eval_samples={limit}: GLUE tasks take a "
              "fixed shuffled sample, the others the first ones; task.max_eval_samples=null evaluates them all)")
    reported = result.get("reported_in_training")
    if reported is not None:
        print(f"{result['metric']} reported by the training run for this checkpoint: {reported:.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
