"""KaSA adapters in Hugging Face PEFT's format (peft >= 0.21: a LoRA adapter with `kasa_config`).

kasa's KaSA block and PEFT's KaSA variant compute the same function on an nn.Linear layer:

    kasa:  W_world x + (alpha / r) dU diag(dSigma) dV^T x      delta_u (n x r), delta_sigma (r), delta_v (r x m)
    PEFT:  W_trunc x + (lora_alpha / r) B diag(lora_diag) A x  lora_B (n x r), lora_diag (r), lora_A (r x m)

so the export is a renaming: delta_v -> lora_A.weight, delta_u -> lora_B.weight, delta_sigma -> lora_diag, and the
trained task heads (kasa's `trainable_modules`) go in as PEFT `modules_to_save`. PEFT stores no removed components:
when it loads the adapter it truncates the base weight again (a full float32 SVD keeping the k - r largest
components), so the folder must be loaded onto the same base model the run started from, and the result matches
kasa's model up to float32 rounding of the two decompositions.

The regulariser: PEFT's `_get_kasa_loss()` sums beta * L2 + gamma * L3 over the adapted modules, kasa averages that
sum over them (paper, appendix A), so the export writes beta / M and gamma / M (M adapted modules): training the
exported adapter further in PEFT regularises exactly as kasa did. PEFT's L3 has only the paper's r x r form; an
adapter trained with `orth_form: authors` (the released code's large Grams) gets that form there, which
`peft_regularizer` records in a note.

Only what PEFT's variant can express is exported: the KaSA methods (kasa, kasa_l2, kasa_sv) on whole nn.Linear
layers, one rank for every layer, removing exactly r components (truncation_rank null or = rank), without the
`principal` initialisation (which also moves the r principal components out of the base weight). Anything else
raises a one-line ValueError naming the problem and the alternative (format=merged works for every method).
This module needs neither peft nor a network: it writes the files PEFT reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kasa.adapters.config import AdapterConfig
from kasa.adapters.io import adapter_state
from kasa.adapters.kasa import KasaBlock
from kasa.adapters.methods import methods_where
from kasa.adapters.model import adapted_layers, adapter_config, module_matches
from kasa.adapters.quantized import QUANTIZED_ATTRIBUTE

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MIN_PEFT_VERSION = "0.21.0"  # the first PEFT release with LoraConfig(kasa_config=...)
KASA_METHODS = methods_where(block="kasa")  # what PEFT's KaSA can express


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for the model class (it picks the PeftModel subclass), or None."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    return None


def check_peft_expressible(config: AdapterConfig, quantization: str | None) -> None:
    """Raise a one-line ValueError if an adapter of this `config`, trained over a base of this `quantization`, cannot
    be written in PEFT's KaSA format: what the saved config alone says, checked before any model loads. The method
    first: no other setting makes another method's adapter exportable."""
    if config.method not in KASA_METHODS:
        raise ValueError(
            f"format=peft exports KaSA adapters only (method kasa, kasa_l2 or kasa_sv), this checkpoint is "
            f"method={config.method}: use format=merged"
        )
    if quantization is not None:
        raise ValueError(
            f"format=peft needs a float base, and this export's is model.quantization={quantization}, over which "
            "PEFT's KaSA would run as plain LoRA on bitsandbytes layers. Use format=merged (the dequantized base, "
            "merged), or model.quantization=null to export the adapter for the float model, as QLoRA adapters are "
            "used (a run trained over a quantized base then differs from it by the quantization's rounding)"
        )
    if config.init == "principal":
        raise ValueError(
            "format=peft cannot express method.init=principal (its base weight also lost the r principal "
            "components, PEFT only removes the r smallest): use format=merged"
        )
    if config.truncation_basis == "activation":
        raise ValueError("format=peft cannot express method.truncation_basis=activation (PEFT removes W's own r "
                         "smallest singular components when it loads the adapter): use format=merged")
    if config.truncation_rank not in (None, config.rank):
        raise ValueError(
            f"format=peft needs method.truncation_rank = rank (PEFT removes exactly r = {config.rank} components, "
            f"this adapter removed {config.truncation_rank}): use format=merged"
        )


def check_peft_exportable(model: nn.Module) -> None:
    """Raise a one-line ValueError if the adapted `model` cannot be written in PEFT's KaSA format."""
    config = adapter_config(model)
    check_peft_expressible(config, getattr(model, QUANTIZED_ATTRIBUTE, None))
    layers = list(adapted_layers(model))
    if not layers:
        raise ValueError("format=peft: the checkpoint adapts no layer; use format=merged")
    for name, layer in layers:
        if type(layer.base_layer) is not nn.Linear:
            raise ValueError(
                f"format=peft supports nn.Linear layers only (PEFT's KaSA refuses others), {name!r} is a "
                f"{type(layer.base_layer).__name__}: use format=merged"
            )
        if list(layer.adapters) != ["weight"]:
            raise ValueError(
                f"format=peft adapts whole layers only, {name!r} has adapters on parts {list(layer.adapters)} of a "
                "fused projection: use format=merged"
            )
        block = layer.adapters["weight"]
        if not isinstance(block, KasaBlock):
            raise ValueError(f"format=peft: {name!r} holds a {type(block).__name__}, not a KaSA block")
    for head in config.trainable_modules:
        for name, _ in layers:
            if any(module_matches(prefix, head) for prefix in [*_prefixes(name), name]):
                raise ValueError(
                    f"format=peft: trainable module {head!r} contains the adapted layer {name!r}, which PEFT cannot "
                    "both adapt and save: use format=merged"
                )


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`, ...)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        block = layer.adapters["weight"]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = block.delta_v
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = block.delta_u
        tensors[f"{PEFT_PREFIX}{name}.lora_diag"] = block.delta_sigma
    heads = adapter_config(model).trainable_modules
    for key, tensor in adapter_state(model).items():
        if ".adapters." in key:
            continue
        module = key.rpartition(".")[0]
        if not any(module_matches(m, h) for h in heads for m in [module, *_prefixes(module)]):
            raise ValueError(
                f"format=peft: the checkpoint trains {key!r}, which is outside the adapted layers and the "
                f"trainable modules {heads}: use format=merged"
            )
        tensors[f"{PEFT_PREFIX}{key}"] = tensor
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


AUTHORS_ORTH_FORM_NOTE = (
    "the run used orth_form=authors (L3 on the large n x n / m x m Grams, which the paper's beta/gamma tables were "
    "tuned with); PEFT's KaSA loss has only the paper's r x r form, so training further in PEFT uses that form"
)


def peft_regularizer(model: nn.Module) -> dict[str, Any]:
    """PEFT's `kasa_config` for the adapter of `model` and what it was derived from, for kasa_export.json: kasa's
    beta and gamma (zero for the terms the method lacks), M (the adapted modules), the orthogonality form, and a
    note when PEFT cannot express that form (None otherwise)."""
    config = adapter_config(model)
    modules = len(list(adapted_layers(model)))
    beta, gamma = config.effective_beta, config.effective_gamma
    return {
        "kasa_config": {"beta": beta / modules, "gamma": gamma / modules},
        "beta": beta,
        "gamma": gamma,
        "modules": modules,
        "orth_form": config.orth_form,
        "note": AUTHORS_ORTH_FORM_NOTE if config.orth_form == "authors" and gamma else None,
    }


def peft_config(model: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json for peft.LoraConfig with kasa_config, targeting exactly the adapted layers."""
    config = adapter_config(model)
    return {
        "peft_type": "LORA",
        "task_type": peft_task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        # Full module names: PEFT matches a list entry exactly or as a dotted suffix, so these pick exactly the
        # layers kasa adapted.
        "target_modules": sorted(name for name, _ in adapted_layers(model)),
        "modules_to_save": list(config.trainable_modules) or None,
        "kasa_config": peft_regularizer(model)["kasa_config"],  # summed over modules by PEFT: beta / M, gamma / M
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None) -> Path:
    """Write the KaSA adapter of `model` (kasa's, after load_adapter) as a PEFT adapter folder."""
    check_peft_exportable(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(peft_state(model), str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    config = peft_config(model, base_model_name_or_path)
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory
