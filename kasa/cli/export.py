"""kasa-export: turn a trained checkpoint into a folder other tools load without kasa.

    kasa-export checkpoint=runs/cola/kasa/2026-11-22_10-00-00_123456 output=exports/cola-merged
    kasa-export checkpoint=runs/.../checkpoints/last format=peft output=exports/cola-peft
    kasa-export checkpoint=... output=... model.path=/models/roberta-base      the base model from another place

format=merged (default): the base model with the adapter merged into its weights, saved with its tokenizer by
transformers' save_pretrained (safetensors). It loads with plain transformers (AutoModelFor....from_pretrained),
no kasa and no peft needed, and gives the adapter model's outputs. Works for every method.

format=peft: a PEFT adapter folder (adapter_config.json with `kasa_config`, adapter_model.safetensors) for KaSA on
nn.Linear layers, loaded with peft >= 0.21 by PeftModel.from_pretrained(<the original base model>, folder). PEFT
repeats the SVD truncation on load, so it must be the same base model the run trained on; for a GGUF base
(model.gguf_file) pass gguf_file= as the printed line does (AutoPeftModel cannot: adapter_config.json names a
folder). PEFT sums KaSA's loss over the M adapted modules where kasa averages it, so `kasa_config` holds beta / M
and gamma / M: the same loss when the adapter trains further in PEFT (kasa_export.json records the run's beta,
gamma and M). PEFT has only the paper's orthogonality form: for a run with orth_form=authors the export says so in
one line, and records it.

Arguments are key=value: `checkpoint` (a run directory or a checkpoint directory), `output` (a new or empty
folder), `format` (merged | peft), `which` (best | last, for a run directory), `overwrite` (true: replace a
non-empty output folder), and dotted overrides of the run's saved model settings (model.path=..., model.dtype=...;
not model.target_modules, head_modules or fused_modules: the adapter is rebuilt as it was trained). Other overrides
(trainer.lr, seed, task.max_eval_samples, ...) would change nothing of the export and are refused. The folder is
written under a temporary name and renamed into place; kasa_export.json in it records what it was made from.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from kasa.cli.common import bool_argument, key_value_arguments, load_saved_config, run_reporting_errors
from kasa.config import ModelConfig
from kasa.run_dir import (
    ADAPTER_WEIGHTS_FILE,
    CHECKPOINTS_DIR,
    EXPORT_INFO_FILE,
    STATE_FILE,
    check_can_make,
    check_checkpoint_unchanged,
    checkpoint_version,
    clean_dead_writes,
    find_checkpoint,
    follow_umask,
    software_versions,
    write_atomically,
    write_json,
)

OWN_KEYS = ("checkpoint", "output", "format", "which", "overwrite")
FORMATS = ("merged", "peft")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty folder unless overwrite is set, and a place where the folder cannot be made (it is
    written beside itself and renamed into place): before the model loads, which takes minutes for a large one.
    Nothing is written here."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output={output} is a file: pass a folder path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"output={output} is not empty: pass overwrite=true to replace it, or another folder")
    check_can_make(output.parent, f"output={output}")


def is_classifier(model: Any) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def load_hint(fmt: str, model_cfg: ModelConfig, model_class: str, output: Path, num_labels: int | None) -> str:
    """The Python line that loads the export: the merged folder alone, or the run's own base (its GGUF file
    included) under the PEFT adapter."""
    from kasa.adapters.peft_format import MIN_PEFT_VERSION
    from kasa.tasks.models import model_source

    if fmt == "merged":
        return f"transformers.{model_class}.from_pretrained({str(output)!r})"
    options = (f", gguf_file={model_cfg.gguf_file!r}" if model_cfg.gguf_file else "") + \
        (f", num_labels={num_labels}" if num_labels is not None else "")
    return (f"peft.PeftModel.from_pretrained(transformers.{model_class}.from_pretrained("
            f"{model_source(model_cfg)!r}{options}), {str(output)!r})  # peft >= {MIN_PEFT_VERSION}")


def export_checkpoint(args: dict[str, Any]) -> dict[str, Any]:
    # The arguments first, before the heavy imports: a typo fails at once.
    fmt = str(args.get("format", "merged")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format={fmt!r}; choose one of: {', '.join(FORMATS)}")
    # resolved (.., symbolic links): two spellings of the run's own folder must not pass for two folders
    output = Path(str(args["output"])).expanduser().resolve()
    overwrite = bool_argument(args, "overwrite", False)
    checkpoint, run_dir = find_checkpoint(Path(str(args["checkpoint"])), args.get("which"))
    checkpoint, run_dir = checkpoint.resolve(), run_dir.resolve()
    if output == checkpoint or output in checkpoint.parents:
        raise ValueError(f"output={output} would replace the checkpoint it exports: choose another folder")
    for folder in (checkpoint, run_dir / CHECKPOINTS_DIR):
        if folder in output.parents:  # best/ and last/ are saved over as a folder, old step-* ones pruned
            raise ValueError(f"output={output} is inside {folder}, which a training run saves over: choose a folder "
                             "outside it")
    check_output(output, overwrite)

    from kasa.adapters import AdapterConfig, dequantize_base, load_adapter, merge_and_unload, read_adapter_config
    from kasa.adapters.peft_format import (
        check_peft_exportable,
        check_peft_expressible,
        peft_regularizer,
        save_peft_adapter,
    )
    from kasa.adapters.quantized import check_room_to_dequantize, merge_note
    from kasa.tasks import build_task
    from kasa.tasks.models import model_source

    overrides = [f"{k}={v}" for k, v in args.items() if k not in OWN_KEYS]
    # the task's settings and the head come from the run; evaluation and the seed play no part in an export
    run_cfg = load_saved_config(run_dir, overrides, "kasa-export writes (the folder goes to output=)", reads=("model",),
                                own_keys=OWN_KEYS)
    trained_over = load_saved_config(run_dir, []).model.quantization if overrides else run_cfg.model.quantization
    version = checkpoint_version(checkpoint)  # a run still training may save over it while it is read
    meta = read_adapter_config(checkpoint)  # a clear error for a foreign or corrupt checkpoint, before any loading
    if fmt == "peft":
        check_peft_expressible(AdapterConfig.from_dict(meta["config"]), run_cfg.model.quantization)

    task = build_task(run_cfg)
    tokenizer, model = task.load_model()
    load_adapter(model, checkpoint)
    model.eval()
    if fmt == "peft":
        check_peft_exportable(model)  # before anything is written
    else:  # a quantized base becomes float weights in CPU memory: a 13B model in bf16 is 26 GB
        check_room_to_dequantize(model, "format=merged", "export on a machine with more memory, or write "
                                 "format=peft (the adapter alone, for the base model) where the method allows it",
                                 device="cpu")

    base = model_source(run_cfg.model)
    load_with = load_hint(fmt, run_cfg.model, type(model).__name__, output,
                          run_cfg.task.num_labels if is_classifier(model) else None)
    state_file = checkpoint / STATE_FILE
    info = {
        "format": fmt,
        "checkpoint": str(checkpoint),
        "run_dir": str(run_dir),
        "adapter_sha256": _sha256(checkpoint / ADAPTER_WEIGHTS_FILE),
        "method": meta["config"].get("method"),
        "adapter_config": meta["config"],
        "base_model": base,
        "model_class": type(model).__name__,
        "overrides": overrides,
        "trained_quantization": trained_over,
        "task": run_cfg.task.name,
        "num_labels": run_cfg.task.num_labels,
        "training_state": json.loads(state_file.read_text()) if state_file.is_file() else None,
        "load_with": load_with,
        "peft_regularizer": peft_regularizer(model) if fmt == "peft" else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": software_versions(),
    }
    check_checkpoint_unchanged(checkpoint, version, "kasa-export read it")  # the record matches the weights
    # said once every check has passed: a refused export is its one error line
    if run_cfg.model.quantization != trained_over:
        print(f"warning: the run trained over a {trained_over or 'float'} base, exported here for the "
              f"{run_cfg.model.quantization or 'float'} model: its outputs differ from the trained model's by the "
              "quantization's rounding (recorded in kasa_export.json)", file=sys.stderr)
    if fmt == "merged" and (warning := merge_note(run_cfg.model.quantization)):
        print(warning, file=sys.stderr)

    def fill(tmp: Path) -> None:
        if fmt == "merged":
            # a quantized base (model.quantization) merges and saves in its compute dtype, in CPU memory: the float
            # model need not fit the GPU that trained the quantized one (the updates move to each weight's device)
            dequantize_base(model, device="cpu")
            merge_and_unload(model)
            model.save_pretrained(tmp)  # safetensors
            tokenizer.save_pretrained(tmp)
        else:
            save_peft_adapter(model, tmp, base)
        write_json(tmp / EXPORT_INFO_FILE, info)
        follow_umask(tmp)

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for leftover in clean_dead_writes(output):
            print(f"removed {leftover}: what a killed export left", file=sys.stderr)
        write_atomically(output, fill, directory=True)  # a crash leaves the old folder or the new one, never half
    except OSError as err:  # said for this command (the generic line's advice is kasa-train's)
        kept = "the earlier folder there is unchanged" if output.exists() else "nothing was written"
        reason = ("no space left on the device" if err.errno in (errno.ENOSPC, errno.EDQUOT)
                  else f"{err.strerror}: {err.filename}")
        raise ValueError(f"cannot write output={output} ({reason}); {kept}: free space or choose another "
                         "output") from err
    note = info["peft_regularizer"]["note"] if fmt == "peft" else None
    return {"output": str(output), "format": fmt, "checkpoint": str(checkpoint), "load_with": load_with, "note": note}


def main(argv: list[str] | None = None) -> None:
    args = key_value_arguments(argv, __doc__, ("checkpoint", "output"),
                               "kasa-export checkpoint=runs/<run dir> output=exports/<name>")
    result = run_reporting_errors(lambda: export_checkpoint(args), OWN_KEYS, output_option="output=...")
    print(f"exported {result['format']} model to {result['output']}")
    print(f"load it with: {result['load_with']}")
    if result["note"]:
        print(f"note: {result['note']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
