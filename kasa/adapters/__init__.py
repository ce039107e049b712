"""Adapter layers (KaSA and the baselines), their injection into a model, and adapter checkpoints.

The public names load on first use (PEP 562), so that reading the light modules (config, the method table) does not
import torch."""

from importlib import import_module
from typing import Any

_WHERE = {  # public name -> the module of kasa.adapters that defines it
    "METHODS": "config", "PEFT_METHODS": "config", "AdapterConfig": "config",
    "load_adapter": "io", "read_adapter_config": "io", "save_adapter": "io",
    "AuxLoss": "model", "ParameterCount": "model", "adapted_layers": "model", "adapter_config": "model",
    "apply_adapters": "model", "aux_loss": "model", "aux_loss_needs_forward": "kasa", "count_parameters": "model",
    "kasa_blocks": "model",
    "merge_adapters": "model", "merge_and_unload": "model", "unmerge_adapters": "model",
    "after_optimizer_step": "peft_baselines", "configure_schedule": "peft_baselines",
    "QUANTIZATIONS": "quantized", "dequantize_base": "quantized", "quantize_base": "quantized",
    "Components": "truncation", "singular_components": "truncation",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kasa.adapters' has no attribute {name!r}")
    value = getattr(import_module(f"kasa.adapters.{_WHERE[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
