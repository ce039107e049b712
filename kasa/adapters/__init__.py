"""Adapter layers (KaSA and the baselines), their injection into a model, and adapter checkpoints."""

from kasa.adapters.config import METHODS, PEFT_METHODS, AdapterConfig
from kasa.adapters.io import load_adapter, read_adapter_config, save_adapter
from kasa.adapters.model import (
    AuxLoss,
    ParameterCount,
    adapted_layers,
    adapter_config,
    apply_adapters,
    aux_loss,
    count_parameters,
    kasa_blocks,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)
from kasa.adapters.peft_baselines import after_optimizer_step, configure_schedule
from kasa.adapters.quantized import QUANTIZATIONS, dequantize_base, quantize_base
from kasa.adapters.truncation import Components, singular_components

__all__ = [
    "METHODS", "PEFT_METHODS", "QUANTIZATIONS", "AdapterConfig", "AuxLoss", "Components", "ParameterCount",
    "adapted_layers", "adapter_config", "after_optimizer_step", "apply_adapters", "aux_loss", "configure_schedule",
    "count_parameters", "dequantize_base", "kasa_blocks", "load_adapter", "merge_adapters", "merge_and_unload",
    "quantize_base", "read_adapter_config", "save_adapter", "singular_components", "unmerge_adapters",
]
