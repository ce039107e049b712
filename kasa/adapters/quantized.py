"""Quantized frozen bases (QLoRA-style) through bitsandbytes: `nf4` (4-bit NormalFloat, double-quantized
statistics, as QLoRA) or `int8` (LLM.int8 with outlier threshold 6).

Order matters for the methods that change W0 (the KaSA ladder, svd_lora, PiSSA, MiLoRA): the model is loaded in
its float dtype, the adapters decompose that full-precision W0 and truncate it, and only then is the *residual*
W0 - W_removed quantized (`quantize_base`). So the removed components are those of the real weight (the minor
components of a dequantized NF4 weight are mostly quantization noise), and the frozen base is the quantized image
of exactly the paper's W_world. The alternative, quantizing W0 and subtracting W_removed as a frozen low-rank term
in every forward, was measured against the unquantized truncated model (scripts/quantized_residual_error.py, figures
in the README): both errors are NF4's own error of nearly the same matrix, and the residual costs no extra matmuls
and no second code path, so it is the one kasa implements. LoRA-family adapters then run in float over the
bitsandbytes layer's forward, as QLoRA does.

Adapter checkpoints never hold base weights, so save/load stays exact and SVD-free: loading rebuilds the float
truncated base from the saved triplets and quantizes it the same way. Folding an adapter into a 4-bit or 8-bit
weight is refused (it would be a second, lossy quantization); `dequantize_base` turns the quantized layers back
into float layers of the compute dtype first, which is what a merged export writes.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kasa.adapters.config import CONFIG_ATTRIBUTE
from kasa.extras import install_extra

QUANTIZATIONS = ("nf4", "int8")
# Methods that run over a quantized base: kasa's own adapter layers (their frozen base may be any module) and BitFit
# (biases stay float parameters of the bitsandbytes layers). Full fine-tuning cannot train 4/8-bit weights, and the
# PEFT-backed methods would wrap kasa's bitsandbytes layers with PEFT's own, untested here.
QUANTIZABLE_METHODS = ("kasa", "kasa_l2", "kasa_sv", "svd_lora", "lora", "pissa", "milora", "bitfit")
PENDING_ATTRIBUTE = "kasa_pending_quantization"
QUANTIZED_ATTRIBUTE = "kasa_quantization"
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: the absmax values are themselves 8-bit, one float32 scale per 256


def merge_note(quantization: str | None) -> str | None:
    """A warning line for merging over this base, when the merged model cannot compute what the quantized one does:
    bitsandbytes' 4-bit layers multiply by the dequantized weight, which the merged float model holds (exact), but
    LLM.int8 also rounds each layer's input to 8 bits (outlier columns kept in 16 bits; on a GPU, and on the CPU in
    evaluation mode, where bitsandbytes 0.50 trains with the dequantized weight), which no float model repeats."""
    if quantization != "int8":
        return None
    return ("warning: an int8 base merges as the float model of its dequantized weights, but LLM.int8 also rounds "
            "each layer's input to 8 bits, which the merged model does not: its outputs differ from the quantized "
            "model's (on SmolLM2-135M by 7-11% of the logits' norm); an nf4 base merges exactly")


def check_quantization(quantization: str | None, method: str, sharded: bool | None = None) -> None:
    """Fail at start for an unknown quantization, a method that cannot run on a quantized base, or a launch under
    FSDP or DeepSpeed (`sharded`; by default read from the environment Accelerate's launcher sets)."""
    if quantization is None:
        return
    if sharded is None:
        sharded = os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if sharded:
        raise ValueError(f"model.quantization={quantization} runs on one GPU or under DDP (multi_gpu.json), not "
                         "under FSDP or DeepSpeed, which would shard the packed 4/8-bit weights")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown model.quantization {quantization!r}; choose one of: null, {', '.join(QUANTIZATIONS)}")
    if method not in QUANTIZABLE_METHODS:
        raise ValueError(
            f"method={method} cannot run on a quantized base (model.quantization={quantization}): use one of "
            f"{', '.join(QUANTIZABLE_METHODS)}, or model.quantization=null"
        )


class _OnceEach(logging.Filter):
    """Lets each message through once: bitsandbytes' int8 matmul warns that it casts its float32 input to float16 on
    every call, hundreds of lines per evaluation, where once says it all."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_ONCE_EACH = _OnceEach()


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ValueError(
            f"model.quantization needs bitsandbytes ({err}): {install_extra('quant')}"
        ) from err
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_ONCE_EACH)  # one object: added once
    return bitsandbytes


def mark_for_quantization(model: nn.Module, quantization: str | None) -> nn.Module:
    """Let `apply_adapters` / `load_adapter` quantize `model`'s base once its adapters have truncated it (what
    kasa's model loader does when `model.quantization` is set)."""
    if quantization is not None:
        check_quantization(quantization, "lora")
        setattr(model, PENDING_ATTRIBUTE, quantization)
    return model


def quantize_pending(model: nn.Module, method: str, skip: list[str]) -> None:
    """Quantize the base of a model marked by `mark_for_quantization`, after its adapters are in place."""
    quantization = getattr(model, PENDING_ATTRIBUTE, None)
    if quantization is None:
        return
    check_quantization(quantization, method)
    quantize_base(model, quantization, skip=skip)
    setattr(model, PENDING_ATTRIBUTE, None)


def _quantized_layer(layer: nn.Module, quantization: str, device: torch.device) -> nn.Module:
    bnb = _bitsandbytes()
    weight = layer.weight.detach()
    if isinstance(layer, Conv1D):
        weight = weight.T  # Conv1D stores W^T; the quantized layer is a Linear with the same function
    out_features, in_features = weight.shape
    compute_dtype = weight.dtype
    bias = layer.bias
    if quantization == "nf4":
        new = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                                quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, quant_type="nf4")
        # bitsandbytes 0.50 repacks a CPU layer's weight for its AVX512-BF16 inference kernel at the first forward in
        # eval mode, and keeps using that kernel, which has no backward, after model.train(): every gradient
        # through the layer silently vanishes (an evaluation, or the start-of-training loss check, before training).
        new.support_avx512bf16_for_cpu = False
    else:
        new = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                  threshold=6.0, device="meta")
        new.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    new.kasa_compute_dtype = compute_dtype  # the dtype of the weight it replaced: what dequantizing gives back
    new.train(layer.training)  # a new module trains; bitsandbytes picks its int8 matmul by the mode
    return new.to(device)  # bitsandbytes quantizes when the weight moves to its device


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or ("." + target + ".") in ("." + name + ".")


def quantizable_layers(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The layers `quantize_base` replaces: frozen nn.Linear / Conv1D layers outside `skip`, except the output
    embedding (QLoRA keeps the LM head in float; it is often tied to the input embedding)."""
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output_embedding
        and not module.weight.requires_grad and not any(_matches(name, target) for target in skip)
    ]


@torch.no_grad()
def quantize_base(model: nn.Module, quantization: str, skip: list[str] | tuple[str, ...] = (),
                  device: str | torch.device | None = None) -> nn.Module:
    """Replace every frozen nn.Linear / Conv1D of `model` (the base layers inside adapted layers included) by its
    bitsandbytes `quantization` in the layer's own dtype as compute dtype, in place. Modules named in `skip` (task
    heads), anything under them, layers with a trainable weight, and the output embedding stay float. `device`:
    where the quantized layers go (default: this process's GPU when there is one, else the layer's device)."""
    if (done := getattr(model, QUANTIZED_ATTRIBUTE, None)) is not None:
        raise ValueError(f"the model's base is quantized already ({done}): quantize a float model, once")
    adapted = getattr(model, CONFIG_ATTRIBUTE, None)  # a plain base is quantized as QLoRA's is, for any adapters after
    check_quantization(quantization, adapted.method if adapted is not None else "lora")
    if device is None and torch.cuda.is_available():
        from accelerate import PartialState

        device = PartialState().device
    layers = quantizable_layers(model, skip)
    if not layers:
        raise ValueError(f"model.quantization={quantization}: the model has no frozen linear layer to quantize "
                         "(quantize_base quantizes the frozen ones: call it after kasa.apply_adapters, which freezes "
                         "the base)")
    for name, module in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        target_device = torch.device(device) if device is not None else module.weight.device
        setattr(parent, child, _quantized_layer(module, quantization, target_device))
    setattr(model, QUANTIZED_ATTRIBUTE, quantization)
    return model


def is_quantized_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not torch.is_floating_point(weight) and hasattr(module, "in_features")


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    return getattr(layer, "kasa_compute_dtype", None) or getattr(layer, "compute_dtype", None) or torch.float32


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """W (out x in) of a bitsandbytes layer, in its compute dtype."""
    bnb = _bitsandbytes()
    weight = layer.weight
    dtype = _compute_dtype(layer)
    if getattr(weight, "quant_state", None) is not None:  # Params4bit
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB  # Int8Params
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).to(dtype)


@torch.no_grad()
def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """Turn every bitsandbytes layer back into an nn.Linear holding its dequantized weight, in `dtype` (default:
    the layer's compute dtype), in place: what the trained model computed, in float, ready to merge or export.
    `device`: where the float layers go (default: where each quantized layer is). Each weight is dequantized where
    its layer is and then moved, one layer at a time, so `device="cpu"` never holds the float model on the GPU: a
    13B model in bf16 (26 GB) does not fit the 24 GB card that trained it in nf4."""
    for name, module in list(model.named_modules()):
        if not is_quantized_layer(module):
            continue
        weight = dequantized_weight(module)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=device or weight.device, dtype=dtype or weight.dtype)
        linear.weight.copy_(weight)
        linear.weight.requires_grad_(False)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
            linear.bias.requires_grad_(module.bias.requires_grad)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    setattr(model, QUANTIZED_ATTRIBUTE, None)
    return model


def dequantize_growth(model: nn.Module, device: str | torch.device | None = None) -> dict[torch.device, int]:
    """Bytes that `dequantize_base(model, device=device)` adds on each device: every float weight (compute dtype)
    where it goes, less the 4/8-bit weight it replaces where that was."""
    growth: dict[torch.device, int] = {}
    for module in model.modules():
        if is_quantized_layer(module):
            quantization = "nf4" if getattr(module.weight, "quant_state", None) is not None else "int8"
            here, there = module.weight.device, torch.device(device) if device is not None else module.weight.device
            growth[there] = growth.get(there, 0) + module.in_features * module.out_features * _compute_dtype(
                module).itemsize
            growth[here] = growth.get(here, 0) - quantized_bytes(module.out_features, module.in_features, quantization)
    return growth


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: on a GPU what the driver has free plus what PyTorch's caching
    allocator holds unused; in CPU memory the kernel's MemAvailable (None where it is not known)."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_room_to_dequantize(model: nn.Module, what: str, way_out: str,
                             device: str | torch.device | None = None) -> None:
    """Refuse, before it starts, a `dequantize_base(model, device=device)` whose float weights would not fit the free
    memory where they go: one clear line (`what` does it; `way_out` says what to do instead) rather than running out
    of memory halfway, or being killed by the kernel."""
    for where, grows in dequantize_growth(model, device).items():
        free = free_memory(where)
        if free is not None and grows > free:
            memory = "CPU memory" if where.type == "cpu" else str(where)
            raise ValueError(f"{what} turns the quantized base back into float weights in {memory}, which needs "
                             f"{grows / 2**30:.1f} GiB more than the {free / 2**30:.1f} GiB free there: {way_out}")


def quantized_bytes(out_features: int, in_features: int, quantization: str) -> int:
    """Bytes that bitsandbytes stores for one out x in weight (without bias): the packed values and their scales."""
    numel = out_features * in_features
    if quantization == "nf4":
        blocks = -(-numel // NF4_BLOCK)
        return numel // 2 + blocks + 4 * -(-blocks // NESTED_BLOCK)  # 4-bit values, 8-bit absmax, float32 scales
    if quantization == "int8":
        return numel + 4 * out_features  # int8 values and one float32 scale per row
    raise ValueError(f"unknown quantization {quantization!r}")


def logical_numel(param: torch.Tensor) -> int:
    """The number of weights a parameter stands for (a packed 4-bit tensor holds two per byte)."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()

