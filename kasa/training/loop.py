"""The training loop, top to bottom: model and adapters, data, optimiser, then epochs of steps (task loss plus
KaSA's auxiliary loss), an evaluation every epoch, checkpoints and metrics in the run directory.

Accelerate drives devices, precision, gradient accumulation and multi-process runs; everything that writes files
happens on the main process only. `resume=auto` continues from the newest complete resumable checkpoint with the
same weights, optimiser, schedule, RNG states and data position, so the run ends as if never interrupted."""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from kasa.adapters import after_optimizer_step, apply_adapters, aux_loss, count_parameters
from kasa.config import RunConfig
from kasa.evaluation.metrics import main_metric
from kasa.tasks import build_task
from kasa.training.checkpoint import (
    MetricsLog,
    load_resumable_weights,
    prune_checkpoints,
    restore_rng,
    restore_training_state,
    resumable_checkpoints,
    save_checkpoint,
    save_training_state,
    write_json,
)
from kasa.training.console import Console
from kasa.training.models import whole_weights

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
REGULARIZATION_FILE = "regularization.jsonl"
CONFIG_FILE = "config.json"


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; the fully trained task head gets its own learning rate (`trainer.head_lr`)."""
    heads = tuple(cfg.method.trainable_modules)
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_head = ".adapters." not in name and any(f".{h}." in f".{name}" for h in heads)
            (head if in_head else body).append(param)
    groups = [{"params": body, "lr": cfg.trainer.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.trainer.head_lr or cfg.trainer.lr})
    return torch.optim.AdamW(groups, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)


def peak_memory_mib() -> dict[str, float]:
    """Peak accelerator memory (allocated by torch) and peak resident memory of this process."""
    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["gpu"] = torch.cuda.max_memory_allocated() / 2**20
    return {k: round(v, 1) for k, v in peak.items()}


def find_resume_checkpoint(cfg: RunConfig, out: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a finished run."""
    if cfg.resume not in (None, "auto"):
        path = Path(cfg.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint directory")
        return path
    found = resumable_checkpoints(out)
    if cfg.resume == "auto" and found:
        return found[-1]
    if (out / SUMMARY_FILE).exists() and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a finished run: pass overwrite=true to replace it, resume=auto to continue it, "
            "or choose another hydra.run.dir"
        )
    if (out / METRICS_FILE).exists() and cfg.resume is None and not cfg.overwrite:
        raise FileExistsError(
            f"{out} holds an unfinished run: pass resume=auto to continue it or overwrite=true to start again"
        )
    return None


def train(cfg: RunConfig, resolved_config: dict[str, Any]) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    # DeepSpeed without a GPU (its CPU accelerator, which the tests use) needs the gloo backend named: accelerate
    # picks none there and would run every process as a world of one.
    cpu_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available()
    accelerator = Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu_deepspeed else None,
        mixed_precision=cfg.trainer.precision,
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,  # the schedule advances once per optimiser step, below
    )
    main = accelerator.is_main_process
    console = Console(enabled=main, progress_bars=cfg.logging.progress)
    resume_from = find_resume_checkpoint(cfg, out)
    set_seed(cfg.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:  # a fresh start (overwrite=true): nothing of an earlier run may be mixed in
            for name in (METRICS_FILE, REGULARIZATION_FILE, SUMMARY_FILE):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if cfg.logging.tensorboard:
        accelerator.init_trackers("tensorboard")

    # Model and adapters.
    task = build_task(cfg)
    with whole_weights(accelerator):
        tokenizer, model = task.load_model()
    apply_adapters(model, cfg.method)
    if resume_from is not None:  # before prepare: sharding engines and DeepSpeed's optimizer copy them from here
        load_resumable_weights(resume_from, model)
    params = count_parameters(model)
    console.print(f"{cfg.method.method}: {params.adapter:,} adapter parameters, {params.trainable:,} trainable "
                  f"of {params.total:,}")

    # Data, optimiser, schedule. The loader is prepared first: its length is then per process, which is what the
    # step counts need.
    train_loader = accelerator.prepare(DataLoader(task.train_dataset(tokenizer), batch_size=cfg.trainer.batch_size,
                                                  shuffle=True, collate_fn=task.collator(tokenizer)))
    steps_per_epoch = math.ceil(len(train_loader) / cfg.trainer.grad_accum)
    total_steps = steps_per_epoch * cfg.trainer.epochs
    if cfg.trainer.max_steps:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    warmup = cfg.trainer.warmup_steps or int(cfg.trainer.warmup_ratio * total_steps)
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler(cfg.trainer.scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:  # DeepSpeed sizes its engine from these; the loader was prepared above
        deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.trainer.batch_size
        deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.trainer.grad_accum
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    metrics_log = MetricsLog(out / METRICS_FILE, enabled=main)
    module_log = MetricsLog(out / REGULARIZATION_FILE, enabled=main)  # per-module [l2, l3_u, l3_v] (figure 11)
    state = {"epoch": 0, "batches_in_epoch": 0, "step": 0, "best": -math.inf, "best_epoch": -1, "history": []}
    if resume_from is not None:
        state = restore_training_state(resume_from, accelerator, model, optimizer, scheduler)
        metrics_log.truncate(state["metrics_size"])
        module_log.truncate(state["regularization_size"])
        console.print(f"resumed from {resume_from} (step {state['step']}, epoch {state['epoch'] + 1})")
    if main:  # only now: a resume that does not fit must leave the run's files as they were
        write_json(out / CONFIG_FILE, resolved_config)

    def save_resumable() -> None:  # every process takes part: sharded tensors are gathered whole
        state["metrics_size"], state["regularization_size"] = metrics_log.size(), module_log.size()
        save_training_state(out / "checkpoints" / f"step-{state['step']:08d}", accelerator, model, optimizer,
                            scheduler, state)
        if main:
            prune_checkpoints(out, cfg.trainer.keep_checkpoints)

    start, tokens = time.perf_counter(), 0
    progress = console.progress(total_steps, completed=state["step"])
    while state["epoch"] < cfg.trainer.epochs and state["step"] < total_steps:
        epoch = state["epoch"]
        model.train()
        batches = train_loader
        train_loader.set_epoch(epoch)
        if state["batches_in_epoch"]:
            batches = accelerator.skip_first_batches(train_loader, state["batches_in_epoch"])
        elif resume_from is not None:
            restore_rng(resume_from)
            resume_from = None
        for batch in batches:
            if resume_from is not None:  # mid-epoch: the data iterator has drawn its seed, as it had before the save
                restore_rng(resume_from)
                resume_from = None
            tokens += int(batch["attention_mask"].sum())
            with accelerator.accumulate(model):
                loss_task = task.loss(model, batch)
                aux = aux_loss(model)
                loss = loss_task + aux.total if aux is not None else loss_task
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at step {state['step'] + 1} (epoch {epoch + 1}): lower "
                        "trainer.lr or set trainer.max_grad_norm; the checkpoints written so far are kept"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.trainer.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    # AdaLoRA's rank budget (PEFT baselines; a no-op for other methods), then the schedule.
                    after_optimizer_step(model, state["step"], total_steps)
                    scheduler.step()
                optimizer.zero_grad()
            state["batches_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            progress.advance(f"epoch {epoch + 1}/{cfg.trainer.epochs} loss {loss.item():.4f}")
            if step % cfg.trainer.log_every == 0 or step == total_steps:
                # Every process reaches this step: the logged losses are means over all of them.
                mean_loss, mean_task = accelerator.reduce(torch.stack([loss.detach(), loss_task.detach()]), "mean")
                record = {"type": "train", "step": step, "epoch": epoch, "loss": mean_loss.item(),
                          "task_loss": mean_task.item(), "lr": scheduler.get_last_lr()[0]}
                if aux is not None:
                    record |= {"aux_loss": aux.total.item(), "l2": aux.l2.item(), "l3": aux.l3.item()}
                    module_log.write({"step": step, "modules": aux.module_values()})
                metrics_log.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "type"}, step=step)
            if step >= total_steps:
                break
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                save_resumable()

        state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
        finished = state["epoch"] >= cfg.trainer.epochs or state["step"] >= total_steps
        if not (cfg.trainer.evaluate_every_epoch or finished):
            save_resumable()
            continue

        # Evaluate; keep the best and the last adapter.
        metrics = task.evaluate(model, accelerator, tokenizer, cfg.task.eval_split, out / "generations")
        score = main_metric(metrics, task.metric)
        record = {"type": "eval", "epoch": epoch, "step": state["step"], "split": cfg.task.eval_split, **metrics}
        metrics_log.write(record)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state["step"])
        state["history"].append(record)
        console.print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        improved = score > state["best"]
        if improved:
            state["best"], state["best_epoch"] = score, epoch
        state["last"] = score
        saved = {"epoch": epoch, "step": state["step"], "metric": task.metric, "score": score, "metrics": metrics}
        if improved and cfg.trainer.save_best:
            save_checkpoint(out / "checkpoints" / "best", accelerator, model, saved)
        save_checkpoint(out / "checkpoints" / "last", accelerator, model, saved)
        save_resumable()
    progress.close()
    train_seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()

    summary = {
        "task": cfg.task.name,
        "method": cfg.method.method,
        "recipe": cfg.recipe,
        "metric": task.metric,
        "best": state["best"],
        "best_epoch": state["best_epoch"],
        "last": state.get("last"),
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "trainable_params": params.adapter,
        "trainable_params_with_head": params.trainable,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(tokens * accelerator.num_processes / max(train_seconds, 1e-9), 1),
        "peak_memory_mib": peak_memory_mib(),
        "seed": cfg.seed,
        "rank": cfg.method.rank,
        "beta": cfg.method.beta,
        "gamma": cfg.method.gamma,
        "overrides": resolved_config.get("hydra_overrides", []),
        "eval_history": state["history"],
    }
    if main:
        write_json(out / SUMMARY_FILE, summary)
        console.summary_table(summary)
    accelerator.end_training()
    return summary
