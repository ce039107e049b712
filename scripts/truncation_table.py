"""The truncation's damage before any training: a causal LM's loss on held-out LLM-Adapters prompts (e.g. BoolQ)
with nothing truncated, and after KaSA's truncation of each row's targets with each basis (`weight`: the paper's r
smallest singular triplets of W; `activation`: the rank-r part whose removal changes the outputs least on
calibration inputs from the training file).

    python scripts/truncation_table.py --data-dir ../shared/data/commonsense/boolq --svd-cache-dir /tmp/svd

The loss is the token-mean cross-entropy of the answers (the prompt carries no loss), as training computes it.
Calibration prompts come from <data-dir>/train.json, held-out prompts from <data-dir>/test.json (their first N
rows each). A row is `targets:rank`, e.g. `q_proj,v_proj:4`. Adapting with KaSA leaves dW = 0 at step 0, so the
adapted model computes exactly the truncated model. Prints a markdown table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import kasa
from kasa.cli.common import fail, register_resolvers
from kasa.cli.parser import ArgumentParser
from kasa.config import ModelConfig
from kasa.data.prompts import IGNORE_INDEX, alpaca_prompt
from kasa.data.files import load_commonsense_file
from kasa.tasks.causal_lm import PadCollator, encode_prompt_response
from kasa.tasks.models import load_causal_lm, load_tokenizer

DEFAULT_ROWS = (
    "q_proj,v_proj:4",
    "v_proj:32",
    "q_proj,k_proj,v_proj,up_proj,down_proj:32",
    "q_proj:32",
    "q_proj,k_proj,up_proj,down_proj:32",
)
BASES = ("weight", "activation")


def model_config(name: str) -> ModelConfig:
    """The `model=<name>` config group of kasa-train, resolved (package model folders, GGUF file)."""
    register_resolvers()
    with initialize_config_module("kasa.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}"])
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def encoded_batches(tokenizer, path: Path, count: int, batch_size: int, max_length: int) -> list[dict]:
    """The first `count` rows of an LLM-Adapters file as padded batches, labels on the answers only."""
    rows = load_commonsense_file(path)[:count]
    if len(rows) < count:
        fail(f"{path} has {len(rows)} rows, fewer than the {count} asked for: lower the count")
    examples = [encode_prompt_response(tokenizer, alpaca_prompt(r["instruction"], r.get("input")), r["output"],
                                       max_length) for r in rows]
    collate = PadCollator(tokenizer.pad_token_id)
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def answer_loss(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    """Token-mean cross-entropy of the labelled (answer) tokens over all batches."""
    model.eval()
    device = next(model.parameters()).device  # load_causal_lm places the model on the GPU when there is one
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep],
                                                   reduction="sum").item()
        tokens += int(keep.sum())
    return total / tokens


def parse_row(text: str) -> tuple[list[str], int]:
    targets, sep, rank = text.rpartition(":")
    if not sep or not targets or not rank.isdigit() or int(rank) < 1:
        fail(f"row {text!r} is not `targets:rank` with a rank >= 1 (e.g. q_proj,v_proj:4)")
    return targets.split(","), int(rank)


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", help="a kasa model config group (default smollm2_135m)")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with train.json and test.json")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="targets:rank, e.g. q_proj,v_proj:4")
    parser.add_argument("--bases", default="weight,activation", help="comma-separated: weight, activation")
    parser.add_argument("--heldout", type=int, default=64, help="test.json prompts the loss is measured on")
    parser.add_argument("--calibration", type=int, default=128, help="train.json prompts giving C = E[x x^T]")
    parser.add_argument("--damping", type=float, default=1e-6, help="C + damping * mean(diag C) I")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--svd-cache-dir", default=None, help="kasa's decomposition cache (default: off)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    bases = args.bases.split(",")
    if unknown := [b for b in bases if b not in BASES]:
        fail(f"unknown basis {unknown[0]!r}; choose from {', '.join(BASES)}")
    rows = [parse_row(text) for text in args.rows]
    for name in ("heldout", "calibration", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for split in ("train.json", "test.json"):
        if not (args.data_dir / split).is_file():
            fail(f"{args.data_dir / split} does not exist: pass --data-dir=<folder with "
                             "train.json and test.json in the LLM-Adapters layout>")

    config = model_config(args.model)
    tokenizer = load_tokenizer(config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = load_causal_lm(config)
    heldout = encoded_batches(tokenizer, args.data_dir / "test.json", args.heldout, args.batch_size, args.max_length)
    calibration = encoded_batches(tokenizer, args.data_dir / "train.json", args.calibration, args.batch_size,
                                  args.max_length)
    start = time.perf_counter()
    base_loss = answer_loss(base, heldout)
    result = {"model": args.model, "data_dir": str(args.data_dir), "heldout": args.heldout,
              "calibration": args.calibration, "damping": args.damping, "base_loss": base_loss,
              "loss_seconds": time.perf_counter() - start, "rows": []}
    print(f"base loss {base_loss:.4f} ({args.heldout} held-out prompts)", flush=True)
    for targets, rank in rows:
        entry = {"targets": targets, "rank": rank}
        for basis in bases:
            model = copy.deepcopy(base)
            adapter = kasa.AdapterConfig(method="kasa", rank=rank, target_modules=targets, truncation_basis=basis,
                                         calibration_damping=args.damping, svd_cache_dir=args.svd_cache_dir)
            start = time.perf_counter()
            try:
                kasa.apply_adapters(model, adapter, calibration=calibration if basis == "activation" else None)
            except ValueError as err:  # a target that matches no layer, a rank too large for one
                fail(str(err))
            seconds = time.perf_counter() - start
            loss = answer_loss(model, heldout)
            entry[basis] = {"loss": loss, "ratio": loss / base_loss, "truncation_seconds": seconds}
            print(f"{','.join(targets)} r {rank} {basis}: loss {loss:.4f} ({loss / base_loss:.3f} x base), "
                  f"truncation {seconds:.1f} s", flush=True)
            del model
        result["rows"].append(entry)

    print()
    print("| targets | r | " + " | ".join(f"loss, {b} basis" for b in bases) + " |")
    print("|---|---:|" + "---:|" * len(bases))
    print("| none (base model) | 0 | " + " | ".join(f"{base_loss:.2f}" for _ in bases) + " |")
    for entry in result["rows"]:
        cells = [f"{entry[b]['loss']:.2f} ({entry[b]['ratio']:.2f}x)" for b in bases]
        print(f"| {', '.join(entry['targets'])} | {entry['rank']} | " + " | ".join(cells) + " |")
    if "activation" in bases:
        worst = max(entry["activation"]["ratio"] for entry in result["rows"])
        result["activation_worst_ratio"] = worst
        print(f"\nactivation basis: worst row {worst:.4f} x base (goal <= 1.02)")
    text = json.dumps(result)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
