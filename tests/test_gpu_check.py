"""scripts/gpu_check.sh with tiny dimensions on the CPU: the whole GPU check runs, through the shell script, and
its last line is the JSON report (peak memory is None without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


# kasa's dependencies that a GPU machine with torch, transformers, accelerate and peft lacks: hidden from the check
HIDDEN = ("datasets", "pyarrow", "pandas", "sklearn", "scipy", "rich", "hydra", "omegaconf")


@pytest.mark.slow
def test_gpu_check_runs_with_tiny_dimensions(tmp_path) -> None:
    """Run with the packages a GPU machine lacks hidden (an import of one fails), so that only bitsandbytes has to be
    carried there."""
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({HIDDEN!r}))\n")
    env = {**os.environ, "KASA_GPU_CHECK_TINY": "1", "KASA_WHEELS": str(tmp_path / "no-wheels"),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tiny"] and report["device"] == "cpu"
    assert report["truncation_seconds_all_layers"] > 0
    assert set(report["step_seconds"]) == {"kasa", "lora", "peft-kasa"}
    assert report["step_ratio_kasa_lora"] > 0 and report["packing_speedup"] > 0
    assert set(report["init_seconds_step_layers"]) == {"weight", "activation"} and report["activation_init_ratio"] > 0
    for variant in ("kasa_bf16", "kasa_nf4"):
        assert report[variant]["step_seconds"] > 0 and report[variant]["peak_mib"] is None
        if importlib.util.find_spec("kasa.estimate") is not None:
            assert report[variant]["estimate_mib"] > 0


def test_gpu_check_refuses_full_size_without_a_gpu(tmp_path) -> None:
    env = {**os.environ, "KASA_WHEELS": str(tmp_path / "no-wheels"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("KASA_GPU_CHECK_TINY", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
