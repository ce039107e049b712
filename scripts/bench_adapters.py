"""python scripts/bench_adapters.py        (full run, 15-25 min on 2 idle CPU cores; --quick: ~3 min smoke run;
                                          --sections init: only the apply_adapters and load_adapter timings)

Benchmark of kasa's adapters: KaSA against LoRA and PEFT's KaSA, and the cost of KaSA's SVD truncation.

1. Train step (forward + backward + AdamW step) on a RoBERTa-base-shaped classifier with random weights, batch 16 x 128
   tokens, r = 8 on query and value, alpha 16, for LoRA, KaSA (loss + `kasa.aux_loss(model).total`) and, if peft is
   installed, PEFT's KaSA (loss + `_get_kasa_loss()`). Only the adapters train (no classifier head), the same for
   every method. Step time: all methods' models in one process, one step of each in turn, so that the machine's
   speed drifting between processes (+-5% here) does not decide the comparison; a step ratio is the median over
   rounds of the ratio of the two methods' steps in that round (scripts/bench_timing.py), and the median step of
   each method is reported too.
   Peak memory: `ru_maxrss` of a fresh process per method (model creation included), with glibc's mmap threshold
   fixed so that the peak is live memory rather than what the allocator happened to keep.
2. Truncation: `kasa.singular_components(w, 8, "smallest", method="gram", device="cpu")` against
   `torch.linalg.svd(w, full_matrices=False)` for random float32 weights of 768 x 768 and 4096 x 14336 (each worker
   first runs both on a small matrix, so one-time imports and library loads are not timed).
3. Cached re-init: `singular_components(..., cache_dir=d)` on the 4096 x 14336 weight, first call against a second
   call in a new process that hits the cache; and `kasa.apply_adapters` on the RoBERTa-shaped model with a cold
   against a warm `svd_cache_dir` (end to end, imports included).
4. Adapter loading: `kasa.load_adapter` of a saved KaSA adapter onto a fresh base model, against `apply_adapters`
   with decomposition (and plain LoRA creation for scale).
5. Activation basis: `apply_adapters` with `truncation_basis="activation"` (the calibration pass over
   the default method.calibration_samples (128) x 32 random tokens, a GLUE-like length, plus the decomposition
   of W L) against the weight basis's `apply_adapters` (both without cache): `activation_init_ratio`; the
   calibration pass alone is timed too (`activation_calibration_s`).

Every measurement runs in a fresh process (this script with `--worker ...`) limited to 2 threads, and the methods
compared are interleaved (step by step within a process for step times, process by process elsewhere) so that
machine noise hits them alike; reported values are medians. A table is printed as results arrive; the last line of stdout
is one JSON object with the ratios, the raw medians (seconds, MiB) and whether each target is met.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kasa
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers, however loaded

import kasa  # noqa: E402
from bench_timing import paired_ratio  # noqa: E402
from kasa.cli.parser import ArgumentParser  # noqa: E402

THREADS = 2
BATCH, SEQ_LEN = 16, 128
RANK, ALPHA = 8, 16.0
ADAPTED = ["query", "value"]
SHAPES = {"768": (768, 768), "4096x14336": (4096, 14336)}
# ratio -> the largest value that meets the target
TARGETS = {
    "step_ratio_kasa_lora": 1.02,
    "mem_ratio_kasa_lora": 1.01,
    "trunc_ratio_768": 0.3,
    "trunc_ratio_4096x14336": 0.2,
    "cached_init_ratio": 0.05,
    "activation_init_ratio": 3.0,
}
CALIBRATION_EXAMPLES, CALIBRATION_LEN = kasa.AdapterConfig().calibration_samples, 32


@dataclass
class Plan:
    """How many fresh processes (rounds) and repeats each section uses."""

    step_rounds: int
    warmup_steps: int
    timed_steps: int
    memory_rounds: int
    trunc_rounds: int
    trunc_repeats_768: int
    big_rounds: int
    big_svd: bool
    cache_rounds: int
    init_rounds: int


FULL = Plan(step_rounds=2, warmup_steps=1, timed_steps=6, memory_rounds=2, trunc_rounds=3, trunc_repeats_768=7, big_rounds=2,
            big_svd=True, cache_rounds=2, init_rounds=3)
QUICK = Plan(step_rounds=1, warmup_steps=1, timed_steps=2, memory_rounds=1, trunc_rounds=1, trunc_repeats_768=3, big_rounds=1,
             big_svd=False, cache_rounds=1, init_rounds=1)


# ---------------------------------------------------------------------------------------------------- worker side


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_model() -> nn.Module:
    """RoBERTa-base shape, random weights, always the same ones (so the SVD cache can hit across processes)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, num_labels=2,
    )
    return RobertaForSequenceClassification(config)


def kasa_config(method: str, cache_dir: str | None = None) -> kasa.AdapterConfig:
    return kasa.AdapterConfig(
        method=method, rank=RANK, alpha=ALPHA, target_modules=ADAPTED, svd_device="cpu", svd_cache_dir=cache_dir
    )


def adapt(model: nn.Module, method: str) -> tuple[nn.Module, Callable[[], torch.Tensor] | None]:
    """The adapted model and its auxiliary loss (None for LoRA)."""
    if method == "lora":
        return kasa.apply_adapters(model, kasa_config("lora")), None
    if method == "kasa":
        model = kasa.apply_adapters(model, kasa_config("kasa"))
        return model, lambda: kasa.aux_loss(model).total
    from peft import KasaConfig, LoraConfig, get_peft_model  # method == "peft-kasa"

    defaults = kasa.AdapterConfig()
    peft_model = get_peft_model(
        model,
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=ADAPTED,
                   kasa_config=KasaConfig(beta=defaults.beta, gamma=defaults.gamma)),
    )
    return peft_model, peft_model.base_model._get_kasa_loss


def train_step(model: nn.Module, aux: Callable[[], torch.Tensor] | None, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    start = time.perf_counter()
    extra = aux() if aux is not None else 0.0  # before the forward pass, as kasa's loop computes it
    loss = model(input_ids=batch[0], labels=batch[1]).loss + extra
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def prepared(method: str) -> tuple[nn.Module, Callable[[], torch.Tensor] | None, torch.optim.Optimizer, float]:
    """The adapted model in training mode, its aux loss, an AdamW over what trains, and the adapter creation time."""
    model = build_model()
    start = time.perf_counter()
    model, aux = adapt(model, method)
    create_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model.train(), aux, optimizer, create_s


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(3, 50265, (BATCH, SEQ_LEN), generator=generator),
            torch.randint(0, 2, (BATCH,), generator=generator))


def worker_steps(methods: list[str], warmup: int, steps: int) -> dict[str, Any]:
    """Step times of several methods in ONE process, one step of each in turn (the order rotating every round), so
    that drifts of the machine's speed hit every method alike."""
    runs = {method: prepared(method) for method in methods}
    batch = fixed_batch()
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_ in range(warmup + steps):
        for i in range(len(methods)):
            method = methods[(round_ + i) % len(methods)]
            model, aux, optimizer, _ = runs[method]
            seconds = train_step(model, aux, optimizer, batch)
            if round_ >= warmup:
                times[method].append(seconds)
    trainable = {m: sum(p.numel() for p in run[0].parameters() if p.requires_grad) for m, run in runs.items()}
    return {"step_times": times, "trainable": trainable}


def worker_memory(method: str, steps: int) -> dict[str, Any]:
    """Peak resident memory of one method: model creation, adaptation and `steps` train steps (the first creates
    the AdamW state). The driver runs it with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_), so freed
    activations go back to the system at once and the peak is the live memory, not what the allocator kept."""
    model, aux, optimizer, create_s = prepared(method)
    batch = fixed_batch()
    for _ in range(steps):
        train_step(model, aux, optimizer, batch)
    return {"peak_rss_mib": peak_rss_mib(), "create_s": create_s}


def random_weight(shape: str) -> torch.Tensor:
    return torch.randn(*SHAPES[shape], generator=torch.Generator().manual_seed(0))


def truncate(weight: torch.Tensor, method: str, cache_dir: str | None = None) -> None:
    if method == "gram":
        kasa.singular_components(weight, RANK, "smallest", method="gram", device="cpu", cache_dir=cache_dir)
    else:
        torch.linalg.svd(weight, full_matrices=False)


def warm_up_libraries() -> None:
    """Pay scipy's import and LAPACK's first call outside the timings (k > 256 takes the Lanczos path)."""
    small = torch.randn(320, 320, generator=torch.Generator().manual_seed(2))
    truncate(small, "gram")
    truncate(small, "svd")


def worker_trunc(shape: str, method: str, repeats: int) -> dict[str, Any]:
    weight = random_weight(shape)
    warm_up_libraries()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        truncate(weight, method)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "times": times}


def worker_cache(cache_dir: str) -> dict[str, Any]:
    weight = random_weight("4096x14336")
    warm_up_libraries()
    hit = any(Path(cache_dir).iterdir())
    start = time.perf_counter()
    truncate(weight, "gram", cache_dir)
    return {"seconds": time.perf_counter() - start, "hit": hit}


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(3, 50265, (BATCH, CALIBRATION_LEN), generator=generator),
             "attention_mask": torch.ones(BATCH, CALIBRATION_LEN, dtype=torch.long)}
            for _ in range(CALIBRATION_EXAMPLES // BATCH)]


def worker_init(mode: str, cache_dir: str | None, adapter_dir: str | None) -> dict[str, Any]:
    model = build_model()
    if mode.startswith("activation"):
        batches = calibration_batches()
        config = kasa_config("kasa")
        config.truncation_basis = "activation"
    start = time.perf_counter()
    if mode == "activation-calibration":  # the calibration pass alone: statistics of every adapted input
        from kasa.adapters.calibration import moment_groups
        from kasa.adapters.model import target_layers

        modules = {name: module for name, (module, _) in target_layers(model, config).items()}
        for _ in moment_groups(model, modules, batches, config.calibration_memory_gib):
            pass
    elif mode == "activation":
        kasa.apply_adapters(model, config, calibration=batches)
    elif mode == "load":
        kasa.load_adapter(model, adapter_dir)
    elif mode == "lora":
        kasa.apply_adapters(model, kasa_config("lora"))
    else:  # kasa-nocache decomposes every weight; kasa-cold fills the SVD cache, kasa-warm reads it
        kasa.apply_adapters(model, kasa_config("kasa", None if mode == "kasa-nocache" else cache_dir))
    return {"seconds": time.perf_counter() - start}


def worker_save(adapter_dir: str) -> dict[str, Any]:
    kasa.save_adapter(kasa.apply_adapters(build_model(), kasa_config("kasa")), adapter_dir)
    return {"saved": adapter_dir}


def run_as_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(THREADS)
    if args.worker == "steps":
        result = worker_steps(args.method.split(","), args.warmup, args.steps)
    elif args.worker == "memory":
        result = worker_memory(args.method, args.steps)
    elif args.worker == "trunc":
        result = worker_trunc(args.shape, args.method, args.repeats)
    elif args.worker == "cache":
        result = worker_cache(args.cache_dir)
    elif args.worker == "init":
        result = worker_init(args.mode, args.cache_dir, args.adapter_dir)
    else:
        result = worker_save(args.adapter_dir)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------- driver side


def child_env(malloc_exact: bool) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(THREADS)
    if malloc_exact:
        # A fixed threshold turns off glibc's adaptive one, which depends on each process's allocation history (an
        # SVD's freed buffers raise it) and made peak RSS vary by +-10% between identical runs.
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    return env


def run_worker(*args: str, malloc_exact: bool = False) -> dict[str, Any]:
    """Run one measurement in a fresh process and return its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], env=child_env(malloc_exact),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(section: str, label: str, round_: int, text: str) -> None:
    """One result line; the 1-minute load average shows how much other work shared the machine."""
    print(f"{section:<12} {label:<22} {round_:>5}  {os.getloadavg()[0]:>5.1f}  {text}", flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def bench_steps(plan: Plan, methods: list[str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_ in range(plan.step_rounds):
        out = run_worker("steps", "--method", ",".join(methods), "--warmup", str(plan.warmup_steps),
                         "--steps", str(plan.timed_steps))
        for method in methods:
            times[method].extend(out["step_times"][method])
            steps = " ".join(f"{t:.2f}" for t in out["step_times"][method])
            row("train step", method, round_, f"median {statistics.median(out['step_times'][method]):.3f} s  "
                f"[{steps}]  trainable {out['trainable'][method]}")
    return times


def bench_memory(plan: Plan, methods: list[str]) -> dict[str, dict[str, list[float]]]:
    results = {method: {"peak_rss_mib": [], "create_s": []} for method in methods}
    for round_ in range(plan.memory_rounds):
        for method in methods:
            out = run_worker("memory", "--method", method, "--steps", "2", malloc_exact=True)
            for key in results[method]:
                results[method][key].append(out[key])
            row("memory", method, round_, f"peak RSS {out['peak_rss_mib']:.0f} MiB  adapter creation "
                f"{out['create_s']:.2f} s")
    return results


def bench_truncation(plan: Plan) -> dict[str, float | None]:
    times: dict[str, list[float]] = {}
    for round_ in range(plan.trunc_rounds):
        for method in ("gram", "svd"):
            out = run_worker("trunc", "--shape", "768", "--method", method, "--repeats", str(plan.trunc_repeats_768))
            times.setdefault(f"768/{method}", []).append(out["seconds"])
            row("truncation", f"768x768 {method}", round_, f"median {out['seconds'] * 1e3:.1f} ms  "
                f"[{' '.join(f'{t * 1e3:.1f}' for t in out['times'])}]")
    big_methods = ("gram", "svd") if plan.big_svd else ("gram",)
    for round_ in range(plan.big_rounds):
        for method in big_methods:
            out = run_worker("trunc", "--shape", "4096x14336", "--method", method, "--repeats", "1")
            times.setdefault(f"4096x14336/{method}", []).append(out["seconds"])
            row("truncation", f"4096x14336 {method}", round_, f"{out['seconds']:.2f} s")
    medians: dict[str, float | None] = {key: statistics.median(values) for key, values in times.items()}
    medians.setdefault("4096x14336/svd", None)
    return medians


def bench_cache(plan: Plan, workdir: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"first": [], "cached": []}
    for round_ in range(plan.cache_rounds):
        cache_dir = workdir / f"svd-cache-{round_}"
        cache_dir.mkdir()
        for phase in ("first", "cached"):
            out = run_worker("cache", "--cache-dir", str(cache_dir))
            if out["hit"] != (phase == "cached"):
                sys.exit(f"cache benchmark: expected hit={phase == 'cached'} on the {phase} call, got {out['hit']}")
            times[phase].append(out["seconds"])
            row("svd cache", f"4096x14336 {phase}", round_, f"{out['seconds']:.3f} s")
    return times


def bench_init(plan: Plan, workdir: Path) -> dict[str, list[float]]:
    adapter_dir = workdir / "adapter"
    run_worker("save", "--adapter-dir", str(adapter_dir))
    modes = ("lora", "kasa-nocache", "kasa-cold", "kasa-warm", "load", "activation", "activation-calibration")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(plan.init_rounds):
        cache_dir = workdir / f"model-cache-{round_}"
        cache_dir.mkdir()
        for mode in modes:
            out = run_worker("init", "--mode", mode, "--cache-dir", str(cache_dir), "--adapter-dir", str(adapter_dir))
            times[mode].append(out["seconds"])
            row("model init", mode, round_, f"{out['seconds']:.3f} s")
    return times


SECTIONS = ("steps", "memory", "trunc", "cache", "init")


def run_benchmark(quick: bool, sections: tuple[str, ...] = SECTIONS) -> None:
    plan = QUICK if quick else FULL
    try:
        import peft  # noqa: F401

        methods = ["lora", "kasa", "peft-kasa"]
    except ImportError:
        methods = ["lora", "kasa"]
    print(f"kasa adapter benchmark ({'quick' if quick else 'full'}), {THREADS} threads, torch {torch.__version__}, "
          f"one fresh process per row", flush=True)
    print(f"{'section':<12} {'what':<22} {'round':>5}  {'load':>5}  result", flush=True)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kasa-bench-") as tmp:
        workdir = Path(tmp)
        # a section left out gives no figures: its ratios are null in the summary
        steps = bench_steps(plan, methods) if "steps" in sections else {}
        memory = bench_memory(plan, methods) if "memory" in sections else {}
        trunc = bench_truncation(plan) if "trunc" in sections else {}
        cache = bench_cache(plan, workdir) if "cache" in sections else {}
        init = bench_init(plan, workdir) if "init" in sections else {}

    def per_method(values: dict[str, list[float]]) -> dict[str, float | None]:
        return {m: statistics.median(values[m]) if m in values else None for m in ("lora", "kasa", "peft-kasa")}

    def step_ratio(method: str, reference: str) -> float | None:  # steps of one round ran back to back
        return paired_ratio(steps[method], steps[reference]) if method in steps and reference in steps else None

    step_s = per_method(steps)
    mem = per_method({m: memory[m]["peak_rss_mib"] for m in memory})
    create = per_method({m: memory[m]["create_s"] for m in memory})
    init_s = {mode: statistics.median(values) for mode, values in init.items()}
    cache_s = {phase: statistics.median(values) for phase, values in cache.items()}
    summary: dict[str, Any] = {
        "step_ratio_kasa_lora": step_ratio("kasa", "lora"),
        "mem_ratio_kasa_lora": ratio(mem["kasa"], mem["lora"]),
        "trunc_ratio_768": ratio(trunc.get("768/gram"), trunc.get("768/svd")),
        "trunc_ratio_4096x14336": ratio(trunc.get("4096x14336/gram"), trunc.get("4096x14336/svd")),
        "cached_init_ratio": ratio(cache_s.get("cached"), cache_s.get("first")),
        "step_ratio_kasa_peftkasa": step_ratio("kasa", "peft-kasa"),
        "mem_ratio_kasa_peftkasa": ratio(mem["kasa"], mem["peft-kasa"]),
        "model_cache_ratio": ratio(init_s.get("kasa-warm"), init_s.get("kasa-cold")),
        "load_vs_decompose_ratio": ratio(init_s.get("load"), init_s.get("kasa-nocache")),
        "activation_init_ratio": ratio(init_s.get("activation"), init_s.get("kasa-nocache")),
        "activation_calibration_s": init_s.get("activation-calibration"),
        "step_s": step_s,
        "peak_rss_mib": mem,
        "adapter_creation_s": create,
        "trunc_s": trunc,
        "svd_cache_4096x14336_s": cache_s,
        "model_init_s": init_s,
        "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "quick": quick,
        "sections": list(sections),
        "threads": THREADS,
    }
    summary["targets"] = {
        key: {"value": summary[key], "max": limit, "met": None if summary[key] is None else summary[key] <= limit}
        for key, limit in TARGETS.items()
    }

    print("\nsummary (medians across processes)")
    for key in list(TARGETS) + ["step_ratio_kasa_peftkasa", "mem_ratio_kasa_peftkasa", "model_cache_ratio",
                                "load_vs_decompose_ratio"]:
        value = summary[key]
        verdict = ""
        if key in TARGETS:
            verdict = "n/a" if value is None else ("met" if value <= TARGETS[key] else "MISSED")
            verdict = f"target <= {TARGETS[key]}: {verdict}"
        print(f"  {key:<26} {'-' if value is None else f'{value:.4f}':>8}  {verdict}")
    print(f"  train step s: {step_s}\n  peak RSS MiB: {mem}\n  truncation s: {trunc}\n  model init s: {init_s}")
    print(json.dumps(summary), flush=True)


def main() -> None:
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one process per method, fewer steps, no 4096 x 14336 SVD reference")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)}); the others' "
                        "figures are null")
    worker = parser.add_argument_group("worker mode (used internally: one measurement in this process)")
    worker.add_argument("--worker", choices=["steps", "memory", "trunc", "cache", "init", "save"])
    worker.add_argument("--method", help="steps: comma-separated, memory: one of lora | kasa | peft-kasa; "
                        "trunc: gram | svd")
    worker.add_argument("--warmup", type=int, default=2, help="steps: untimed steps of each method")
    worker.add_argument("--steps", type=int, default=5, help="steps: timed steps of each method; memory: steps")
    worker.add_argument("--shape", choices=list(SHAPES), help="trunc: weight shape")
    worker.add_argument("--repeats", type=int, default=1, help="trunc: timed calls")
    worker.add_argument("--mode", choices=["lora", "kasa-nocache", "kasa-cold", "kasa-warm", "load", "activation",
                                           "activation-calibration"], help="init")
    worker.add_argument("--cache-dir", help="cache, init: SVD cache folder")
    worker.add_argument("--adapter-dir", help="init, save: adapter checkpoint folder")
    args = parser.parse_args()
    if args.worker:
        run_as_worker(args)
    else:
        sections = tuple(args.sections.split(","))
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            parser.error(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}")
        run_benchmark(args.quick, sections)


if __name__ == "__main__":
    main()
