"""kasa-estimate against a measured peak on the CPU: MiniLM (the demo recipe) and SmolLM2-135M-Instruct (E2E on
../shared/data/e2e), a few training steps each through kasa-train.

The measured training peak is the run's peak resident memory (summary.json, `peak_memory_mib.rss`) minus the
resident memory of a process that has only imported what kasa-train imports (interpreter, torch, transformers,
datasets: memory that a GPU's allocator would never see). Last line: one JSON object with the relative errors.

    python scripts/estimate_check.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
E2E = ROOT.parent / "shared" / "data" / "e2e"
RUNS = {
    "minilm": ["trainer.batch_size=32", "trainer.max_length=128"],
    "smollm2": ["model=smollm2_135m", "task=e2e", f"task.data_dir={E2E}", "task.train_split=devset",
                "task.max_train_samples=64", "task.eval_split=test", "task.max_eval_samples=2",
                "task.generation.max_new_tokens=4", "task.generation.batch_size=2", "method.rank=8",
                "model.target_modules=[q_proj,k_proj,up_proj,down_proj]", "trainer.batch_size=8",
                "trainer.max_length=128"],
}
BASELINE = ("import resource, kasa.training.loop, kasa.tasks, kasa.cli.train, datasets, transformers, gguf; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}


def measured_peak_mib(overrides: list[str], steps: int, out: Path) -> float:
    command = [sys.executable, "-m", "kasa.cli.train", *overrides, f"trainer.max_steps={steps}", "trainer.epochs=1",
               "trainer.save_best=false", "logging.progress=false", f"hydra.run.dir={out}"]
    subprocess.run(command, check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())["peak_memory_mib"]["rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from kasa.cli.estimate import compose_run
    from kasa.estimate import estimate_memory

    baseline = float(subprocess.run([sys.executable, "-c", BASELINE], check=True, env=ENV, capture_output=True,
                                    text=True).stdout.split()[-1])
    print(f"resident memory after imports: {baseline:.0f} MiB")
    results = {"baseline_mib": baseline}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            peak = measured_peak_mib(overrides, args.steps, Path(tmp) / name) - baseline
            estimate = estimate_memory(compose_run(overrides))["peak_bytes"] / 2**20
            error = abs(estimate - peak) / peak
            results[name] = {"measured_mib": round(peak, 1), "estimate_mib": round(estimate, 1),
                             "relative_error": round(error, 3)}
            print(f"{name}: measured {peak:.0f} MiB, estimated {estimate:.0f} MiB, error {error:.1%}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
