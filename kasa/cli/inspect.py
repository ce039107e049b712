"""kasa-inspect: what the configured truncation costs the model, before any training.

    kasa-inspect model=smollm2_135m task=commonsense task.data_dir=../shared/data/commonsense task.train_split=boolq/train
    kasa-inspect recipe=glue/roberta_base_cola method.truncation_basis=activation threshold=0.02
    kasa-inspect recipe=... output_dir=runs/inspect/cola held_out=128

Takes the same recipe and overrides as kasa-train, plus `threshold=` (relative loss increase that flags a module,
default 0.05), `held_out=` (held-out training examples the losses are measured on, default 64) and `output_dir=`
(default runs/inspect/<time>). It loads the model and the calibration examples of the training split, applies the
configured truncation and measures, on held-out examples not used for the calibration statistics, the loss with
nothing truncated, with every target truncated and with each module truncated alone, and per module the share of
its input energy along the removed directions (against a uniform spread) and the relative change of its output.
It prints a table, writes truncation_report.json, truncation_report.md and truncation_report.png into output_dir,
and prints the `model.target_modules=[...]` override that leaves the flagged modules out.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from kasa.cli.common import compose_run, quiet_libraries, run_reporting_errors
from kasa.config import RunConfig
from kasa.run_dir import check_can_make, time_stamp, write_atomically, write_json

REPORT = "truncation_report"
OWN_KEYS = ("threshold", "held_out", "output_dir")  # besides the run config's keys


def too_few_examples(available: int, held_out: int, cfg: RunConfig) -> str:
    """The refusal of a split too small for the held-out examples (and the calibration ones, which only the
    activation basis takes), with the held_out= that fits."""
    from kasa.training.calibration import more_rows, split_size

    calibration = cfg.method.calibration_samples if cfg.method.truncation_basis == "activation" else 0
    fits = available - calibration
    size = split_size(available, cfg)
    if not calibration:
        return (f"the training split has {size}, fewer than held_out={held_out}: pass held_out={fits} or "
                f"fewer{more_rows(cfg)}")
    fewer = f"pass held_out={fits} or fewer, or " if fits >= 1 else ""  # held_out is at least 1
    return (f"the training split has {size}, fewer than method.calibration_samples={calibration} plus "
            f"held_out={held_out}: {fewer}lower method.calibration_samples{more_rows(cfg)}")


def inspect_truncation(cfg: RunConfig, threshold: float, held_out: int) -> dict[str, Any]:
    """The damage report of `cfg`'s truncation (see the module docstring); writes it into cfg.output_dir."""
    if not cfg.method.truncates:
        raise ValueError(f"method {cfg.method.method!r} removes nothing from the base weights, so there is nothing "
                         "to inspect: choose a truncating method (kasa, kasa_l2, kasa_sv, svd_lora)")
    import torch
    from accelerate.utils import set_seed

    from kasa.adapters import adapted_layers, apply_adapters
    from kasa.tasks import build_task
    from kasa.tasks.models import load_tokenizer
    from kasa.training.calibration import batches_of, calibration_rows, mean_loss, relative_increase
    from kasa.training.damage import measure_damage, untruncated
    from kasa.training.preflight import check_config_values

    check_config_values(cfg)  # as kasa-train checks the same settings
    task = build_task(cfg)
    dataset = task.train_dataset(load_tokenizer(cfg.model))  # the data's checks in seconds, before the model loads
    calibration_part, held_part = calibration_rows(dataset, cfg, held_out)
    if len(held_part) < held_out:
        raise ValueError(too_few_examples(len(dataset), held_out, cfg))
    set_seed(cfg.seed)  # a new task head (a classifier's) is drawn at random: the same report for the same command
    tokenizer, model = task.load_model()
    collate = task.collator(tokenizer)
    calibration, held = (batches_of(dataset, rows, collate, cfg) for rows in (calibration_part, held_part))
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    base_loss = mean_loss(task.loss, model, held)
    apply_adapters(model, cfg.method, calibration=calibration, calibration_inputs=task.model_inputs)
    truncated_loss, modules = measure_damage(model, task.loss, held, task.model_inputs,
                                            progress=cfg.logging.progress)
    rows = []
    for damage in modules:
        increase = relative_increase(base_loss, damage.loss)
        rows.append({
            "name": damage.name, "type": _module_type(damage.name), "layer": _layer_index(damage.name),
            "loss": damage.loss, "relative_increase": increase, "energy_share": damage.energy_share,
            "uniform_share": damage.uniform_share,
            "energy_ratio": damage.energy_share / damage.uniform_share if damage.uniform_share else None,
            "output_change": damage.output_change, "flagged": increase > threshold,
        })
    layers = dict(adapted_layers(model))
    parts = {name: list(layer.adapters) for name, layer in layers.items()}
    flagged = {r["name"] for r in rows if r["flagged"]}
    override_loss = None  # the override's loss, measured: the damages of the modules alone do not add up
    if flagged:
        with untruncated([layers[name] for name in flagged]):
            override_loss = mean_loss(task.loss, model, held)
    adapted = {f"{r['name']}.{p}" if p != "weight" else r["name"]: r["name"] in flagged for r in rows
               for p in parts[r["name"]]}
    report = {
        "base_loss": base_loss,
        "truncated_loss": truncated_loss,
        "relative_increase": relative_increase(base_loss, truncated_loss),
        "threshold": threshold,
        "method": cfg.method.method,
        "truncation_basis": cfg.method.truncation_basis,
        "truncation_rank": cfg.method.removed_rank,
        "target_modules": cfg.method.target_modules,
        "calibration_examples": sum(len(b["input_ids"]) for b in calibration),
        "held_out_examples": len(held_part),
        "output_dir": str(cfg.output_dir),
        "modules": rows,
        "flagged": [r["name"] for r in rows if r["flagged"]],
        "override": (f"'model.target_modules=[{','.join(leave_out(cfg.method.target_modules, adapted))}]'"
                     if flagged else None),
        "override_loss": override_loss,  # every module truncated but the flagged ones
    }
    _write_report(Path(cfg.output_dir), report)
    return report


def leave_out(targets: list[str], adapted: dict[str, bool]) -> list[str]:
    """The target_modules that adapt exactly the modules of `adapted` (name -> flagged) that are not flagged, as short
    as it goes: a target none of whose modules is flagged stays as it was written (`q_proj`), the others give way to
    the full names of their modules that are kept."""
    from kasa.adapters.model import module_matches

    kept: list[str] = []
    for target in targets:
        matched = [name for name in adapted if module_matches(name, target)]
        kept.extend([target] if not any(adapted[name] for name in matched) else
                    [name for name in matched if not adapted[name]])
    return list(dict.fromkeys(kept))


def _layer_index(name: str) -> int | None:
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return numbers[0] if numbers else None


def _module_type(name: str) -> str:
    return re.sub(r"^.*?\.\d+\.", "", name)  # what follows the layer index: self_attn.q_proj, attention.self.value


def _table(report: dict[str, Any]) -> str:
    lines = [
        "| module | loss alone | increase | input energy along removed | uniform | x uniform | output change | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["modules"]:
        ratio = "-" if r["energy_ratio"] is None else f"{r['energy_ratio']:.2f}"
        lines.append(f"| {r['name']} | {r['loss']:.4f} | {r['relative_increase']:+.2%} | {r['energy_share']:.2e} | "
                     f"{r['uniform_share']:.2e} | {ratio} | {r['output_change']:.2e} | "
                     f"{'FLAGGED' if r['flagged'] else ''} |")
    return "\n".join(lines)


def _summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    from kasa.training.calibration import relative_increase

    lines = [
        f"{report['method']} r {report['truncation_rank']} on {report['target_modules']}, "
        f"{report['truncation_basis']} basis: loss on {report['held_out_examples']} held-out training examples "
        f"{report['base_loss']:.4f} untruncated, {report['truncated_loss']:.4f} truncated "
        f"({report['relative_increase']:+.1%})",
    ]
    flagged, threshold = report["flagged"], report["threshold"]
    remaining = report["relative_increase"]
    if flagged:
        remaining = relative_increase(report["base_loss"], report["override_loss"])
        lines.append(f"{len(flagged)} module(s) raise the loss by more than {threshold:.0%} alone: "
                     f"{', '.join(flagged)}")
        lines.append(f"to leave them out: {report['override']} (loss then {report['override_loss']:.4f}, "
                     f"{remaining:+.1%})")
    else:
        lines.append(f"no module raises the loss by more than {threshold:.0%} alone")
    if remaining > threshold:
        lines.append(f"the modules kept still raise the loss by {remaining:+.1%} together"
                     + (": method.truncation_basis=activation removes what their inputs use least (run kasa-inspect "
                        "with it to compare), or lower method.truncation_rank"
                        if report["truncation_basis"] == "weight" else ": lower method.truncation_rank"))
    lines.append(f"report: {out / (REPORT + '.json')}, {out / (REPORT + '.md')}, {out / (REPORT + '.png')}")
    return lines


def _write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{REPORT}.json", report)
    text = "# Truncation damage\n\n" + "\n\n".join(_summary_lines(report, out)[:-1]) + "\n\n" + _table(report) + "\n"
    write_atomically(out / f"{REPORT}.md", lambda tmp: tmp.write_text(text))
    _plot(report, out / f"{REPORT}.png")


def _plot(report: dict[str, Any], path: Path) -> None:
    """Loss increase of each module truncated alone, by layer, one bar series per module type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["modules"]
    types = list(dict.fromkeys(r["type"] for r in rows))
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None}) or [0]
    width = 0.8 / len(types)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) * len(types) + 2), 4))
    for i, kind in enumerate(types):
        points = [(r["layer"] or 0, 100 * r["relative_increase"]) for r in rows if r["type"] == kind]
        ax.bar([layers.index(x) + i * width for x, _ in points], [y for _, y in points], width, label=kind)
    ax.axhline(100 * report["threshold"], color="red", linestyle="--", linewidth=1, label="threshold")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [str(x) for x in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("loss increase, this module truncated alone (%)")
    ax.set_title(f"{report['truncation_basis']} basis, r {report['truncation_rank']}: loss "
                 f"{report['base_loss']:.3f} -> {report['truncated_loss']:.3f} with all truncated")
    ax.legend(fontsize="small")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def run(argv: list[str]) -> dict[str, Any]:
    """kasa-inspect with these arguments; returns the report (raises ValueError on bad input)."""
    own: dict[str, Any] = dict(zip(OWN_KEYS, (0.05, 64, f"runs/inspect/{time_stamp()}")))
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep and not key.startswith("~"):  # ~group removes a config group, as in kasa-train
            raise ValueError(f"arguments are key=value, got {arg!r}: e.g. kasa-inspect recipe=glue/roberta_base_cola")
        if key not in own:
            overrides.append(arg)
            continue
        try:
            own[key] = type(own[key])(value)
        except ValueError:
            kind = "a whole number of examples" if isinstance(own[key], int) else "a number"
            raise ValueError(f"{key}={value!r} is not {kind}: e.g. {key}={own[key]}") from None
    if not own["threshold"] >= 0:  # nan too
        raise ValueError(f"threshold={own['threshold']} is not allowed: pass a relative loss increase >= 0, e.g. 0.05")
    if own["held_out"] < 1:
        raise ValueError(f"held_out={own['held_out']} is not allowed: pass a number of examples >= 1, e.g. 64")
    check_can_make(own["output_dir"], f"output_dir={own['output_dir']}")
    cfg = compose_run(overrides, own["output_dir"])
    quiet_libraries()
    return inspect_truncation(cfg, own["threshold"], own["held_out"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's composition errors are raised, and reported in one line
    report = run_reporting_errors(lambda: run(argv), OWN_KEYS, output_option="output_dir=...")
    print(_table(report))
    for line in _summary_lines(report, Path(report["output_dir"])):
        print(line)


if __name__ == "__main__":
    main()
