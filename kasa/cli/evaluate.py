"""kasa-eval: re-evaluate a saved checkpoint on a task split and report the metric the training run reported.

    kasa-eval checkpoint=runs/cola/kasa/2026-11-22_10-00-00            the run's best checkpoint, validation split
    kasa-eval checkpoint=runs/.../checkpoints/last split=test task.data_dir=../shared/data/sst2
    kasa-eval checkpoint=... merge=true                                 merge the adapter into the weights first

Arguments are key=value: `checkpoint` (a run directory or a checkpoint directory), `which` (best | last, for a
run directory; without `best`, `last`), `split` (default: the run's evaluation split), `merge` (true | false:
evaluate the merged model that `kasa-export format=merged` writes; a quantized base is dequantized to its compute
dtype first, as there), `batch_size` (the evaluation batch: trainer.eval_batch_size of a classification task,
task.generation.batch_size of a generation task), and any dotted override of the run's saved config
(model.path=..., task.data_dir=...). Writes eval_<split>.json into the checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kasa.cli.common import bool_argument, key_value_arguments, run_reporting_errors
from kasa.run_dir import (
    BEST_CHECKPOINT,
    GENERATIONS_DIR,
    STATE_FILE,
    find_checkpoint,
    load_run_config,
    read_config,
    write_json,
)

OWN_KEYS = ("checkpoint", "which", "split", "merge", "batch_size")


def evaluate_checkpoint(args: dict[str, Any]) -> dict[str, Any]:
    from accelerate import Accelerator

    from kasa.adapters import dequantize_base, load_adapter, merge_adapters
    from kasa.evaluation.metrics import main_metric
    from kasa.tasks import build_task
    from kasa.training.preflight import check_config_values

    merge = bool_argument(args, "merge", False)  # the arguments before anything loads
    if "batch_size" in args and not (args["batch_size"].isdigit() and int(args["batch_size"]) >= 1):
        raise ValueError(f"batch_size={args['batch_size']!r} is not allowed: pass a whole number >= 1")
    checkpoint, run_dir = find_checkpoint(Path(str(args["checkpoint"])), str(args.get("which", BEST_CHECKPOINT)))
    overrides = [f"{k}={v}" for k, v in args.items() if k not in OWN_KEYS]
    if "batch_size" in args:  # classification evaluates in batches of its own; generation tasks generate in batches
        kind = read_config(run_dir).get("task", {}).get("kind", "glue")
        key = "trainer.eval_batch_size" if kind == "glue" else "task.generation.batch_size"
        overrides.append(f"{key}={args['batch_size']}")
    run_cfg = load_run_config(run_dir, overrides)
    check_config_values(run_cfg)  # an override's value (decoding, attention) is refused before the model loads
    split = str(args.get("split") or run_cfg.task.eval_split)

    accelerator = Accelerator()
    task = build_task(run_cfg)
    task.check_evaluation()
    tokenizer, model = task.load_model()
    load_adapter(model, checkpoint)
    if merge:  # a 4/8-bit weight cannot hold the update: merge as kasa-export format=merged does, in float
        dequantize_base(model)
        merge_adapters(model)
    model = accelerator.prepare(model)
    metrics = task.evaluate(model, accelerator, tokenizer, split, checkpoint / GENERATIONS_DIR)
    result = {
        "checkpoint": str(checkpoint),
        "split": split,
        "metric": task.metric,
        "score": main_metric(metrics, task.metric),
        "metrics": metrics,
    }
    state_file = checkpoint / STATE_FILE
    if state_file.is_file():
        result["reported_in_training"] = json.loads(state_file.read_text()).get("score")
    if accelerator.is_main_process:
        write_json(checkpoint / f"eval_{split}.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    args = key_value_arguments(argv, __doc__, ("checkpoint",), "kasa-eval checkpoint=runs/<run dir>")
    result = run_reporting_errors(lambda: evaluate_checkpoint(args))
    print(f"{result['split']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    reported = result.get("reported_in_training")
    if reported is not None:
        print(f"{result['metric']} reported by the training run for this checkpoint: {reported:.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
