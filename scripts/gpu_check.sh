#!/usr/bin/env bash
# The GPU check: kasa on a LLaMA3-8B-shaped model with random weights, bf16, on one H100/H200 in at most ~8 minutes
# (truncation of all seven projections of 32 layers, step times KaSA / LoRA / PEFT's KaSA, packing tokens/s, peak
# memory bf16 and nf4, kasa's memory estimate against the measured peak). Last line of stdout: one JSON object.
#
#   bash scripts/gpu_check.sh            on a GPU machine (see scripts/README.md for the wheels to carry)
#   bash scripts/gpu_check.sh --tiny     tiny dimensions on any device (KASA_GPU_CHECK_TINY=1 does the same)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Wheels carried to a machine that has torch, transformers, accelerate and peft but not kasa's other dependencies.
wheels="${KASA_WHEELS:-$here/../wheels}"
if [ -d "$wheels" ]; then
    python -m pip install --quiet --no-index --find-links "$wheels" "$wheels"/*  # wheels, and antlr4's sdist
fi
missing=$(python - <<'PY'
import importlib.util
needed = ["torch", "transformers", "accelerate", "peft"]  # what the check's kasa modules import
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
PY
)
if [ -n "$missing" ]; then
    echo "error: missing Python packages: $missing (carry their wheels in $wheels, see scripts/README.md)" >&2
    exit 2
fi
exec timeout "${KASA_GPU_CHECK_TIMEOUT:-480}" python "$here/gpu_check.py" "$@"
