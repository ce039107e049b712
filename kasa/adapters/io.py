"""Adapter checkpoints: safetensors tensors plus a JSON config, never pickle.

The checkpoint holds the trainable tensors (adapter blocks, task heads) and the singular triplets each block removed
from its base weight, so loading onto the original base model rebuilds the trained model exactly, with no SVD."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kasa.adapters import peft_baselines
from kasa.adapters.config import AdapterConfig
from kasa.adapters.layer import weight_matrix
from kasa.adapters.model import adapted_layers, adapter_config, apply_adapters, unchanged_on_error
from kasa.adapters.quantized import quantize_pending
from kasa.run_dir import ADAPTER_CONFIG_FILE as CONFIG_FILE
from kasa.run_dir import ADAPTER_WEIGHTS_FILE as WEIGHTS_FILE
from kasa.run_dir import follow_umask, write_atomically, write_json

FORMAT = "kasa-adapter/1"


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the file's permissions following the umask like every other file kasa writes
    (safetensors creates its files 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    follow_umask(Path(path))


def refuse_non_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """A checkpoint holding NaN or inf would evaluate silently to chance level: refuse it, naming the tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: tensor {name} holds NaN or inf values (saved after training diverged?): "
                             "this checkpoint is unusable; use another one")


def _named_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers, whose names carry a prefix of theirs (`_orig_mod.`,
    `module.`) that a checkpoint loaded into the plain model would not find. No compiled model exists before
    torch._dynamo is imported, and importing it only to ask costs seconds."""
    dynamo = sys.modules.get("torch._dynamo")
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter checkpoint needs, by its name in the plain model's `state_dict()` (inside a
    torch.compile or DDP wrapper)."""
    model = _named_model(model)
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        for key, tensor in layer.adapters.state_dict().items():
            state[f"{name}.adapters.{key}"] = tensor
    for name, param in model.named_parameters():  # heads, biases (BitFit), everything (full fine-tuning)
        if param.requires_grad and ".adapters." not in name:
            state[name] = param
    state.update(peft_baselines.projection_buffers(model))  # VeRA's frozen shared projections (PEFT baselines)
    return state


@contextlib.contextmanager
def _zero3_gathered(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, the partitioned parameters among `tensors` whole for the duration (read only)."""
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`adapter_state` whole, detached and on the CPU, whatever holds the parameters: FSDP2 keeps them as DTensor
    shards and ZeRO-3 as partitions with an empty `.data`. Collective under those engines: every process calls it."""
    state = adapter_state(model)
    with _zero3_gathered(list(state.values())):
        return {
            name: _whole(t).detach().to("cpu", copy=True).contiguous() for name, t in state.items()
        }


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 DTensor shard; any other tensor as it is. No DTensor exists before
    torch.distributed.tensor is imported, and importing it only to ask costs every command ~0.5 s at start."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor


def save_adapter(model: nn.Module, directory: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter of `model` to `directory`. Under FSDP2 / ZeRO-3, every process computes
    `tensors = full_adapter_state(model)` and the main process alone passes them here. Merged adapters are refused:
    the saved base weights of trained modules around them and the adapter would both hold the update."""
    model = _named_model(model)
    if any(getattr(module, "merged", False) is True for module in model.modules()):  # kasa's layers and PEFT's
        raise ValueError("the adapters are merged into their base weights: unmerge_adapters(model) before saving")
    config = adapter_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = full_adapter_state(model)
    meta = {
        "format": FORMAT,
        "config": config.to_dict(),
        "base_model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    # Each file goes in atomically, so a crash never leaves a half-written file.
    write_atomically(directory / WEIGHTS_FILE, lambda tmp: save_tensors(tensors, tmp, metadata={"format": FORMAT}))
    write_json(directory / CONFIG_FILE, meta)
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a directory written by kasa (save_adapter or a run's checkpoint)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err}); use another checkpoint") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kasa adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


class UnreadableAdapter(ValueError):
    """A checkpoint's adapter file that is missing, truncated or damaged."""


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The adapter weights a checkpoint folder holds, finite, or one error naming the file."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise UnreadableAdapter(f"cannot read {path} ({err}): the checkpoint is missing or truncated") from err
    refuse_non_finite(tensors, path)
    return tensors


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` to a freshly loaded base `model` (in place) and return it."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    config = AdapterConfig.from_dict(meta["config"])
    tensors = read_adapter_tensors(directory)
    with unchanged_on_error(model):  # the model as it was given, so that the right adapter can be loaded onto it
        apply_adapters(model, config, initialise=False)
        # AdaLoRA's ranknum, a constant that half-precision runs saved as trained before kasa froze it: not loaded
        expected = adapter_state(model)
        tensors = {key: value for key, value in tensors.items() if ".ranknum." not in key or key in expected}
        check_fits(model, tensors, directory, meta.get("base_model"))
        check_removed_components(model, tensors, meta.get("base_model"))
    fill_adapter(model, tensors)
    return model


def check_removed_components(model: nn.Module, tensors: dict[str, torch.Tensor], base_model: str | None) -> None:
    """Refuse tensors whose removed singular triplets (u, s, v) are not those of `model`'s weights: a checkpoint
    loaded onto another model of the same shapes had its other model's components subtracted, without a word. In
    either truncation basis W^T u = v diag(s) (the activation basis's v = L^-T V_r: U_r^T W L = S_r V_r^T); off by
    more than 1% of v diag(s) and float noise (1e-3 of the weight's RMS singular value) is another weight. A base
    weight that the checkpoint holds itself (a trained module around the layer) is not the model's to check."""
    for name, layer in adapted_layers(model):
        if f"{name}.base_layer.weight" in tensors:
            continue
        weight = weight_matrix(layer.base_layer)
        for part, (start, stop) in layer.slices.items():
            u, s, v = (tensors[f"{name}.adapters.{part}.removed_{x}"] for x in "usv")
            if not s.numel():
                continue
            rows = weight[start:stop].detach().float()
            expected = v * s
            mismatch = (rows.T @ u.to(rows.device)).cpu() - expected
            noise = 1e-3 * rows.norm().item() / min(rows.shape) ** 0.5 * s.numel() ** 0.5
            if mismatch.norm() > 0.01 * expected.norm() + noise:
                raise ValueError(f"this adapter does not fit this model: the singular components it removed from "
                                 f"{name} are not those of this model's weight (it was trained on "
                                 f"{base_model or 'another model'}): load it onto the base model it was trained on")


def fill_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """An adapter's saved tensors (checked to fit) into `model`, adapted with `initialise=False`: the blocks and the
    triplets they removed, the base weights truncated by those (no decomposition), the trained base weights, then a
    pending quantization of the truncated base, as in training."""
    config = adapter_config(model)
    expected = adapter_state(model)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    for _, layer in adapted_layers(model):
        layer.truncate_base()
    with torch.no_grad():  # a trained base weight (trainable_modules around an adapted layer) was saved truncated
        for key, target in expected.items():
            if ".adapters." not in key:
                target.copy_(tensors[key])
    quantize_pending(model, config.method, config.trainable_modules)  # the truncated base, as in training


def check_fits(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path, base_model: str | None) -> None:
    """Refuse a checkpoint whose tensors are not those of `model`'s adapters, by name and shape."""
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            f"it was saved for base model {base_model!r}"
        )
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(tensors[key].shape)} but the model expects "
                f"{tuple(target.shape)}: it was saved for base model {base_model!r}"
            )
