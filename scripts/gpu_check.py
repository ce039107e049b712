"""The GPU check that scripts/gpu_check.sh runs (see scripts/README.md): kasa on a LLaMA3-8B-shaped model with random
weights in bfloat16, at most ~8 minutes on one H100/H200. `--tiny` (or KASA_GPU_CHECK_TINY=1) runs the same code with
tiny dimensions on whatever device there is, the CPU included (the test suite does).

1. Truncation: `apply_adapters` with KaSA r 16 on all seven projections (q, k, v, o, gate, up, down) of all 32
   layers, the decompositions on the GPU.
2. Step time on a few layers (batch x length tokens, loss on the last three quarters of each row): kasa's KaSA
   against kasa's LoRA and PEFT's KaSA, one step of each in turn; a ratio is the median over rounds of the ratio
   within a round (as in bench_llm.py), the median steps are reported beside it.
3. Real tokens per second with KaSA over the same random-length examples: padded batches against packed rows.
4. Peak memory (torch.cuda.max_memory_allocated, or None on the CPU) of KaSA steps on the bf16 base and on the nf4
   base (`model.quantization=nf4`, bitsandbytes), with their step times, and `kasa.estimate.estimate_memory`'s peak
   for the same runs.
5. The activation basis's cost at initialisation on the step model's layers: `apply_adapters` with
   `truncation_basis="activation"` (the calibration pass over the default method.calibration_samples examples of
   CALIBRATION_LENGTH random tokens, then the decompositions of W L) against the weight basis
   (`activation_init_ratio`).

The last line of stdout is one JSON object."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kasa
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers, however loaded

from kasa.adapters import AdapterConfig, apply_adapters, aux_loss  # noqa: E402
from kasa.config import RunConfig  # noqa: E402
from kasa.data.prompts import IGNORE_INDEX  # noqa: E402
from kasa.tasks.batching import PackedCollator, pack_examples, packed_row  # noqa: E402
from bench_timing import paired_ratio  # noqa: E402
from kasa.tasks.causal_lm import CausalLMTask, PadCollator  # noqa: E402
from kasa.cli.parser import ArgumentParser  # noqa: E402

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32.0
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5)


class Sizes:
    def __init__(self, tiny: bool) -> None:
        self.shape = TINY if tiny else LLAMA3_8B
        self.all_layers, self.step_layers = (4, 2) if tiny else (32, 4)
        self.batch, self.length = (2, 64) if tiny else (4, 2048)
        self.warmup, self.steps = (1, 2) if tiny else (2, 5)
        self.examples = 24 if tiny else 64
        self.calibration_length = 16 if tiny else 256


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(sizes: Sizes, layers: int, device: torch.device) -> nn.Module:
    """A LLaMA with random weights in bfloat16, made on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", **sizes.shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def adapter_config(method: str, device: torch.device) -> AdapterConfig:
    return AdapterConfig(method=method, rank=RANK, alpha=ALPHA, target_modules=TARGET_MODULES,
                         svd_device=device.type, svd_cache_dir=None)


def adapted(base: nn.Module, method: str, device: torch.device) -> tuple[nn.Module, Any]:
    """A copy of `base` with `method` ("kasa", "lora" or "peft-kasa") and its auxiliary loss (or None)."""
    model = copy.deepcopy(base)
    if method == "peft-kasa":
        from peft import KasaConfig, LoraConfig, get_peft_model

        defaults = AdapterConfig()
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES,
                                                 kasa_config=KasaConfig(beta=defaults.beta, gamma=defaults.gamma)))
        return model, model.base_model._get_kasa_loss
    apply_adapters(model, adapter_config(method, device))
    return model, (lambda: aux_loss(model).total) if method == "kasa" else None


class Stepper:
    def __init__(self, model: nn.Module, aux: Any, task: CausalLMTask, device: torch.device) -> None:
        self.model, self.aux, self.task, self.device = model.train(), aux, task, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(self, batch: dict[str, torch.Tensor], task: CausalLMTask | None = None) -> float:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        synchronize(self.device)
        start = time.perf_counter()
        extra = self.aux() if self.aux is not None else 0.0  # before the forward pass, as kasa's loop computes it
        loss = (task or self.task).loss(self.model, batch) + extra
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start


def examples(sizes: Sizes, count: int, seed: int, lengths: tuple[int, int]) -> list[dict[str, list[int]]]:
    """Random token rows, the first quarter a prompt without loss."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        n = rng.randint(*lengths)
        ids = [rng.randrange(3, sizes.shape["vocab_size"]) for _ in range(n)]
        prompt = max(1, n // 4)
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def task_for(sizes: Sizes, packing: bool = False, quantization: str | None = None) -> CausalLMTask:
    cfg = RunConfig()
    cfg.task.kind = "commonsense"  # a causal-LM task (what the estimate builds its model for)
    cfg.model.name, cfg.model.dtype, cfg.model.quantization = "meta-llama/Meta-Llama-3-8B", "bfloat16", quantization
    cfg.model.target_modules = cfg.method.target_modules = list(TARGET_MODULES)
    cfg.method.rank, cfg.method.alpha = RANK, ALPHA
    cfg.trainer.batch_size, cfg.trainer.max_length, cfg.trainer.packing = sizes.batch, sizes.length, packing
    return CausalLMTask(cfg)


def bench_truncation(sizes: Sizes, device: torch.device) -> float:
    model = build(sizes, sizes.all_layers, device)
    synchronize(device)
    start = time.perf_counter()
    apply_adapters(model, adapter_config("kasa", device))
    synchronize(device)
    seconds = time.perf_counter() - start
    del model
    return seconds


def bench_activation_init(sizes: Sizes, base: nn.Module, device: torch.device) -> dict[str, float]:
    """Seconds of apply_adapters with the weight basis and with the activation basis (calibration included)."""
    generator = torch.Generator().manual_seed(2)
    examples = AdapterConfig().calibration_samples
    batches = [{"input_ids": torch.randint(3, sizes.shape["vocab_size"], (sizes.batch, sizes.calibration_length),
                                           generator=generator),
                "attention_mask": torch.ones(sizes.batch, sizes.calibration_length, dtype=torch.long)}
               for _ in range(examples // sizes.batch)]
    seconds = {}
    for basis in ("weight", "activation"):
        model = copy.deepcopy(base)
        config = adapter_config("kasa", device)
        config.truncation_basis = basis
        synchronize(device)
        start = time.perf_counter()
        apply_adapters(model, config, calibration=batches if basis == "activation" else None)
        synchronize(device)
        seconds[basis] = time.perf_counter() - start
        del model
    return seconds


def bench_steps(sizes: Sizes, base: nn.Module, device: torch.device) -> dict[str, list[float]]:
    """Each method's step times, one list entry per round."""
    methods = ["kasa", "lora"] + (["peft-kasa"] if importlib.util.find_spec("peft") else [])
    task = task_for(sizes)
    steppers = {m: Stepper(*adapted(base, m, device), task, device) for m in methods}
    batch = PadCollator(0)(examples(sizes, sizes.batch, 0, (sizes.length, sizes.length)))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_ in range(sizes.warmup + sizes.steps):
        for i in range(len(methods)):
            method = methods[(round_ + i) % len(methods)]
            seconds = steppers[method].step(batch)
            if round_ >= sizes.warmup:
                times[method].append(seconds)
    return times


def bench_packing(sizes: Sizes, base: nn.Module, device: torch.device) -> dict[str, float]:
    stepper = Stepper(*adapted(base, "kasa", device), task_for(sizes), device)
    rows = examples(sizes, sizes.examples, 1, (sizes.length // 16, sizes.length))
    padded = [PadCollator(0)(rows[i:i + sizes.batch]) for i in range(0, len(rows), sizes.batch)]
    packed_rows = [packed_row([rows[i] for i in group])
                   for group in pack_examples([len(r["input_ids"]) for r in rows], sizes.length)]
    per_batch = max(1, round(len(packed_rows) / len(padded)))  # as many steps' worth of real tokens
    packed = [PackedCollator(0, one_row=False)(packed_rows[i:i + per_batch])
              for i in range(0, len(packed_rows), per_batch)]
    packed_task = task_for(sizes, packing=True)
    stepper.step(padded[0])
    rates = {}
    for mode, batches, task in (("padded", padded, None), ("packed", packed, packed_task)):
        seconds = sum(stepper.step(batch, task) for batch in batches)
        rates[mode] = sum(int(b["attention_mask"].sum()) for b in batches) / seconds
    return rates


def bench_memory(sizes: Sizes, device: torch.device, quantization: str | None) -> dict[str, Any]:
    """Peak memory and step time of KaSA steps on the bf16 (or quantized) base, and the estimate for that run."""
    model = build(sizes, sizes.step_layers, device)
    if quantization is not None:
        from kasa.adapters.quantized import mark_for_quantization

        mark_for_quantization(model, quantization)
    apply_adapters(model, adapter_config("kasa", device))
    task = task_for(sizes, quantization=quantization)
    stepper = Stepper(model, lambda: aux_loss(model).total, task, device)
    batch = PadCollator(0)(examples(sizes, sizes.batch, 0, (sizes.length, sizes.length)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [stepper.step(batch) for _ in range(1 + sizes.steps)][1:]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result: dict[str, Any] = {"step_seconds": statistics.median(times), "peak_mib": peak}
    if importlib.util.find_spec("kasa.estimate") is not None:
        from transformers import LlamaConfig

        from kasa.estimate import estimate_memory

        architecture = LlamaConfig(num_hidden_layers=sizes.step_layers, **sizes.shape)
        result["estimate_mib"] = estimate_memory(task.cfg, architecture=architecture)["peak_bytes"] / 2**20
        if peak is not None:
            result["estimate_error"] = abs(result["estimate_mib"] - peak) / peak
    del stepper, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("KASA_GPU_CHECK_TINY") == "1",
                        help="tiny dimensions on any device (a test of the script itself)")
    args = parser.parse_args()
    sizes = Sizes(args.tiny)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("error: no CUDA GPU: the check needs one (--tiny runs it with tiny dimensions anywhere)", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "tiny": args.tiny, "shape": sizes.shape, "batch": sizes.batch, "length": sizes.length}

    def done(section: str, start: float) -> None:
        print(f"{section}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    start = time.perf_counter()
    report["truncation_seconds_all_layers"] = bench_truncation(sizes, device)
    done("truncation", start)
    start = time.perf_counter()
    base = build(sizes, sizes.step_layers, device)
    times = bench_steps(sizes, base, device)
    report["step_seconds"] = {m: statistics.median(t) for m, t in times.items()}
    report["step_ratio_kasa_lora"] = paired_ratio(times["kasa"], times["lora"])
    if "peft-kasa" in times:
        report["step_ratio_kasa_peft_kasa"] = paired_ratio(times["kasa"], times["peft-kasa"])
    done("steps", start)
    start = time.perf_counter()
    rates = bench_packing(sizes, base, device)
    report["real_tokens_per_second"] = rates
    report["packing_speedup"] = rates["packed"] / rates["padded"]
    done("packing", start)
    start = time.perf_counter()
    init = bench_activation_init(sizes, base, device)
    report["init_seconds_step_layers"] = init
    report["activation_init_ratio"] = init["activation"] / init["weight"]
    del base
    done("activation basis", start)
    start = time.perf_counter()
    report["kasa_bf16"] = bench_memory(sizes, device, None)
    if importlib.util.find_spec("bitsandbytes") is not None:
        report["kasa_nf4"] = bench_memory(sizes, device, "nf4")
        if report["kasa_bf16"]["peak_mib"]:
            report["nf4_memory_ratio"] = report["kasa_nf4"]["peak_mib"] / report["kasa_bf16"]["peak_mib"]
    else:
        report["kasa_nf4"] = "skipped: bitsandbytes is not installed (carry its wheel, see scripts/README.md)"
    done("memory", start)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
