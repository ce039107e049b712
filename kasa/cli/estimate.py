"""kasa-estimate: will a run fit one GPU? Peak memory per process from the architecture alone (no weights).

    kasa-estimate recipe=commonsense/llama3_8b gpu_memory=24GiB
    kasa-estimate recipe=instruction/llama2_13b_alpaca model.quantization=nf4 gpu_memory=24GiB
    kasa-estimate recipe=commonsense/llama3_8b gpu_memory=80GiB num_processes=4 sharding=zero3

Takes the recipe and overrides of kasa-train, plus `gpu_memory` (e.g. 24GiB; default 24GiB; GB and G are read as
GiB, as GPU makers mean them: a 24 GB RTX 3090 is 24GiB, and 1 GiB of it is kept for the CUDA context), `num_processes`
(default 1), `sharding` (none | zero2 | zero3 | fsdp: what the Accelerate config shards; default none) and, for the
causal-LM tasks, `loss_share` (the share of the max_length columns that predict a response token, where kasa
computes the logits; default 1.0, an upper bound; e.g. 0.35 for Alpaca rows of 256 tokens). The architecture comes
from model.path, the config.json kasa ships for its recipes' models (offline), or the Hub.
Prints parameters, memory per part, which causal-LM loss the run takes (chunked, or plain under torch.compile and
for heads that are not exactly a linear layer), peak with and without gradient checkpointing, whether it fits, and
overrides that would make it fit; the last line is one JSON object.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from kasa.cli.common import compose_run, fail, quiet_libraries, run_reporting_errors

OWN_KEYS = ("gpu_memory", "num_processes", "sharding", "loss_share")
LOSS_WAYS = {"chunked": "chunked (one chunk of labelled tokens' logits at a time)",
             "plain": "plain (the logits of every labelled column: torch.compile, or logits not exactly the head's)"}


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def run(argv: list[str]) -> dict[str, Any]:
    from kasa.estimate import RESERVE_BYTES, estimate_memory, parse_memory, suggestions
    from kasa.training.preflight import check_config_values

    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in OWN_KEYS and "=" in a}
    gpu_bytes = parse_memory(own.get("gpu_memory", "24GiB"))
    try:
        processes = int(own.get("num_processes", "1"))
    except ValueError:
        raise ValueError(f"num_processes={own['num_processes']!r} is not a whole number: e.g. num_processes=4")
    try:
        loss_share = float(own.get("loss_share", "1.0"))
    except ValueError:
        raise ValueError(f"loss_share={own['loss_share']!r} is not a number: e.g. loss_share=0.35")
    sharding = own.get("sharding", "none")
    cfg = compose_run([a for a in argv if a.split("=", 1)[0] not in OWN_KEYS])
    check_config_values(cfg, decomposes=False, on_this_machine=False)  # kasa-train's refusals, in its words
    quiet_libraries()
    estimate = estimate_memory(cfg, processes, sharding, loss_share=loss_share)
    parts = estimate["bytes"]
    quant = f", {estimate['quantization']} base" if estimate["quantization"] else ""
    print(f"{cfg.model.name} ({estimate['dtype']}{quant}), method {cfg.method.method}, per process of "
          f"{processes} (sharding {sharding}), batch {estimate['batch_size']} x {estimate['max_length']} tokens")
    print(f"  parameters            {estimate['parameters']:>16,}")
    print(f"  trainable parameters  {estimate['trainable_parameters']:>16,}")
    for label, key in (("weights", "weights"), ("  gathered (sharded)", "gathered_weights"),
                       ("adapters (trainable)", "adapters"),
                       ("removed components", "removed_components"), ("gradients", "gradients"),
                       ("AdamW states", "optimizer"), ("activations", "activations"),
                       ("  with checkpointing", "activations_checkpointed"),
                       ("largest temporaries", "backward_transient")):
        print(f"  {label:21s} {_gib(parts[key]):>16}")
    if estimate["loss"] is not None:
        print(f"  causal-LM loss: {LOSS_WAYS[estimate['loss']]}")
    print(f"  peak without gradient checkpointing {_gib(estimate['peak_bytes_without_checkpointing'])}")
    print(f"  peak with gradient checkpointing    {_gib(estimate['peak_bytes_with_checkpointing'])}")
    budget = gpu_bytes - RESERVE_BYTES
    fits = estimate["peak_bytes"] <= budget
    checkpointing = "on" if estimate["gradient_checkpointing"] else "off"
    print(f"peak {_gib(estimate['peak_bytes'])} (gradient checkpointing {checkpointing}) on {_gib(gpu_bytes)} "
          f"({_gib(RESERVE_BYTES)} kept for the CUDA context): {'fits' if fits else 'does NOT fit'}")
    found = [] if fits else suggestions(cfg, estimate, gpu_bytes, processes, sharding, loss_share)
    for overrides, peak in found:
        print(f"  fits with {overrides}  (peak {_gib(peak)})")
    if not fits and not found:
        tried = "checkpointing, nf4 and smaller micro-batches" if sharding == "none" else (
            "checkpointing and smaller micro-batches (nf4 does not run sharded)")
        more = "more GPUs with sharding=zero3" if sharding == "none" else "more processes (num_processes)"
        print(f"  no combination of {tried} fits: use {more} or a larger GPU")
    return {**estimate, "gpu_memory_bytes": gpu_bytes, "fits": fits,
            "fit_overrides": [{"overrides": o, "peak_bytes": p} for o, p in found]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    bad = [a for a in argv if "=" not in a and not a.startswith("~")]  # ~group removes a config group, as kasa-train
    if bad:
        fail(f"arguments must be key=value, got {bad[0]!r}: e.g. kasa-estimate recipe=commonsense/llama3_8b "
             "gpu_memory=24GiB")
    result = run_reporting_errors(lambda: run(argv), OWN_KEYS, output_option="")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
