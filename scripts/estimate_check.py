"""kasa-estimate against the measured peak of training steps on the CPU, and the peak of a KaSA step on an nf4
base against the same on a float32 (and bfloat16) base. MiniLM on RTE (../shared/data/rte) and SmolLM2-135M-Instruct
on E2E (../shared/data/e2e), each in a fresh process.

Each process loads the model and applies the adapters exactly as kasa-train does (kasa.tasks), returns freed memory
to the system, resets the kernel's peak-resident counter (/proc/self/clear_refs), then runs a few AdamW steps on
real batches. Three measures: `measured_mib` = peak resident memory during the steps minus the resident memory
before the model loaded (interpreter and libraries, which a GPU's allocator never sees); `measured_tensors_mib` = the
model's tensors (parameters, buffers and bitsandbytes' quantization state, counted exactly) plus the growth of
resident memory from just before the first step to the peak, which leaves out what loading the model left in the
process besides its tensors (the modules transformers imports, the tokenizer, the data, parsing buffers) but keeps
what the first steps add that no tensor owns (library code paged in, freed heap memory glibc keeps: 70-80 MiB for
MiniLM); `exact_tensors_mib` = the model's tensors and the AdamW states plus the most that one more step's own
tensors hold at once, followed op by op (scripts/tensor_peak.py), the largest over the batches: the CPU's counterpart
of torch.cuda.max_memory_allocated, and what the estimate models. `relative_error` is against it,
`resident_relative_error` against the second. Loading is left out on purpose: a quantized base is loaded in float and
quantized layer by layer, on the CPU when a GPU is the target. Every row of the runs below is max_length tokens long
(max_length is below the examples' lengths), as the estimate assumes; the estimate is given the share of the columns
that carry the causal-LM loss in these batches (`loss_share`). Last line: one JSON object with the relative errors
and the nf4 / float32 and nf4 / bfloat16 ratios.

    python scripts/estimate_check.py [--steps 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers

from kasa.cli.parser import ArgumentParser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SMOLLM2 = ["model=smollm2_135m", "task=e2e", f"task.data_dir={DATA / 'e2e'}", "task.train_split=devset",
           "task.max_train_samples=64", "method=kasa", "method.rank=8",
           "model.target_modules=[q_proj,k_proj,up_proj,down_proj]", "trainer.batch_size=8", "trainer.max_length=48"]
RUNS = {
    "minilm": ["task=glue/rte", f"task.data_dir={DATA / 'rte'}", "task.max_train_samples=256",
               "trainer.batch_size=32", "trainer.max_length=64"],
    "smollm2": SMOLLM2,
    "smollm2_nf4": [*SMOLLM2, "model.quantization=nf4"],
    "smollm2_bf16": [*SMOLLM2, "model.dtype=bfloat16"],
}


def resident_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(overrides: list[str], steps: int) -> dict[str, float]:
    """Runs in its own process: the peak of `steps` training steps above the pre-load resident memory."""
    import torch
    from torch.utils.data import DataLoader

    from kasa.adapters import apply_adapters, aux_loss
    from kasa.cli.common import compose_run
    from kasa.estimate import estimate_memory, loss_share_of
    from kasa.tasks import build_task
    from kasa.training.loop import build_optimizer
    from tensor_peak import model_storages, tensor_peak_bytes

    cfg = compose_run(overrides)
    torch.manual_seed(0)
    task = build_task(cfg)
    before = resident_mib("VmRSS")
    tokenizer, model = task.load_model()
    apply_adapters(model, cfg.method)
    loader = DataLoader(task.train_dataset(tokenizer), batch_size=cfg.trainer.batch_size, shuffle=True,
                        collate_fn=task.collator(tokenizer))
    batches = [batch for _, batch in zip(range(steps), loader)]
    # The causal-LM loss covers the columns that predict a labelled token: the estimate is told their share.
    share = 1.0 if cfg.task.kind == "glue" else max(
        loss_share_of(b["labels"], cfg.trainer.max_length) for b in batches)
    estimate = estimate_memory(cfg, loss_share=share, device="cpu")
    optimizer = build_optimizer(model, cfg)
    model.train()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give loading's freed memory back before the peak is reset
    loaded = resident_mib("VmRSS")
    storages = model_storages(model)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    def step(batch: dict[str, torch.Tensor]) -> None:
        extra = aux_loss(model)  # before the forward pass, as kasa's loop computes it
        loss = task.loss(model, batch)
        (loss + extra.total if extra is not None else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches:
        step(batch)
    peak = resident_mib("VmHWM")
    exact = max(tensor_peak_bytes(model, optimizer, lambda: step(batch)) for batch in batches) / 2**20
    return {"measured_mib": peak - before, "measured_tensors_mib": sum(storages.values()) / 2**20 + peak - loaded,
            "exact_tensors_mib": exact, "estimate_mib": estimate["peak_bytes"] / 2**20,
            "batch_shapes": [tuple(batch["input_ids"].shape) for batch in batches], "loss_share": share}


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(RUNS[args.one], args.steps)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    results: dict = {}
    for name in RUNS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps)], check=True,
                             env=env, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["relative_error"] = abs(row["estimate_mib"] - row["exact_tensors_mib"]) / row["exact_tensors_mib"]
        row["resident_relative_error"] = (abs(row["estimate_mib"] - row["measured_tensors_mib"])
                                          / row["measured_tensors_mib"])
        results[name] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(f"{name}: batches {row['batch_shapes']}, tensors at their peak {row['exact_tensors_mib']:.0f} MiB, "
              f"estimated {row['estimate_mib']:.0f} MiB, error {row['relative_error']:.1%} (resident: "
              f"{row['measured_tensors_mib']:.0f} MiB with the steps' growth, error {row['resident_relative_error']:.1%};"
              f" {row['measured_mib']:.0f} MiB above the process before loading)", flush=True)
    tensors = {name: row["exact_tensors_mib"] for name, row in results.items()}
    results["nf4_memory_ratio"] = round(tensors["smollm2_nf4"] / tensors["smollm2"], 3)
    results["nf4_memory_ratio_vs_bf16"] = round(tensors["smollm2_nf4"] / tensors["smollm2_bf16"], 3)
    results["estimate_error_max"] = max(r["relative_error"] for k, r in results.items() if isinstance(r, dict))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
