"""Baselines kasa does not implement itself, run through PEFT (the optional extra `peft`):

    dora      LoraConfig(use_dora=True): LoRA plus a trained magnitude vector per output (Liu et al., 2024)
    adalora   AdaLoraConfig: SVD-form LoRA, P diag(E) Q, whose rank budget shrinks from `init_r` to `method.rank`
              per matrix on average during training (Zhang et al., 2023)
    vera      VeraConfig: frozen random projections shared by all layers, trained scaling vectors (Kopiczko et al.)

They are selected like the native methods (`method=dora`, `AdapterConfig(method="adalora")`) and share the rest of
kasa: `apply_adapters` injects them in place (the model keeps its class and its parameter names; the task head named
in `trainable_modules` trains in place, as with the native methods, rather than as a PEFT `modules_to_save` copy),
`count_parameters` reports their trainable parameters, `save_adapter` / `load_adapter` write and read them in kasa's
checkpoint format (safetensors + adapter_config.json), and `merge_adapters` / `merge_and_unload` fold them in.

How the kasa fields map: `rank` is DoRA's and VeRA's r and AdaLoRA's target average rank (`target_r`); `alpha` is
`lora_alpha` (DoRA, AdaLoRA; VeRA has none); `dropout` is the adapter dropout; `target_modules` as for the native
methods (fused parts such as `c_attn.q` are not supported). `peft_options` are passed to the PEFT config on top.

AdaLoRA's budget schedule needs the total number of optimiser steps and a call after every optimiser step (before the
gradients are zeroed: it scores the parameters by |p * grad|). The training loop calls
`after_optimizer_step(model, step, total_steps)`, which fixes the schedule on its first call; a custom loop does the
same, or calls `configure_schedule(model, total_steps)` first. In `peft_options`, `tinit` and `tfinal` (the warm-up
and final fine-tuning phases) may be fractions of the total steps (a float below 1) or step counts (an integer);
`init_r` defaults to 1.5 x rank (12 for r = 8, AdaLoRA's GLUE budget). AdaLoRA's orthogonal regularisation
(`orth_reg_weight`, PEFT default 0.5) is returned by `kasa.aux_loss`, like KaSA's. A resumable checkpoint keeps the
rank allocator's importance averages and rank pattern (`allocator_state`), so a resumed AdaLoRA run goes on bit for bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from kasa.adapters.config import CONFIG_ATTRIBUTE, PEFT_METHODS, AdapterConfig
from kasa.extras import install_extra
from kasa.adapters.kasa import AuxLoss, Regularization

TUNER_ATTRIBUTE = "kasa_peft_tuner"  # the PEFT tuner object, kept in the model's __dict__ (not a submodule)
ADAPTER_NAME = "default"
ADALORA_PLACEHOLDER_STEPS = 1_000_000  # AdaLoraConfig needs a total_step before the loop knows the real one
PROJECTION_BUFFERS = (".vera_A.", ".vera_B.")
ALLOCATOR_AVERAGES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the rank allocator's per-parameter importance scores


def _peft(method: str) -> Any:
    try:
        import peft
    except ImportError as err:
        raise ValueError(f"method={method} runs through PEFT, which is not installed: {install_extra('peft')}") from err
    return peft


def _steps(value: Any, total: int, name: str) -> int:
    """A schedule length: a float in [0, 1) is a fraction of `total` steps, anything else a step count."""
    if isinstance(value, float) and 0.0 <= value < 1.0:
        return int(value * total)
    if isinstance(value, bool) or not float(value).is_integer() or value < 0:
        raise ValueError(f"peft_options.{name} must be a fraction in [0, 1) or a number of steps, got {value!r}")
    return int(value)


def _adalora_schedule(options: dict[str, Any], total_steps: int) -> dict[str, int]:
    tinit = _steps(options.get("tinit", 0), total_steps, "tinit")
    tfinal = _steps(options.get("tfinal", 0), total_steps, "tfinal")
    if tinit >= total_steps - tfinal:
        raise ValueError(
            f"AdaLoRA's schedule leaves no budgeting phase: tinit={tinit} and tfinal={tfinal} steps of "
            f"{total_steps} in all; lower peft_options.tinit / tfinal (fractions of the steps work for any length)"
        )
    return {"total_step": total_steps, "tinit": tinit, "tfinal": tfinal}


def peft_config(config: AdapterConfig, total_steps: int | None = None) -> Any:
    """The PEFT config object of `config` (a PEFT-backed method)."""
    peft = _peft(config.method)
    fused = [t for t in config.target_modules if "." in t and t.rpartition(".")[0].split(".")[-1] in config.fused_modules]
    if fused:
        raise ValueError(f"method={config.method} (PEFT) cannot adapt parts of fused projections {fused}: "
                         "target whole modules")
    options = dict(config.peft_options)
    common: dict[str, Any] = {"target_modules": list(config.target_modules), "bias": "none"}
    if config.method == "dora":
        cls = peft.LoraConfig
        kwargs = {"r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_dora": True}
    elif config.method == "adalora":
        cls = peft.AdaLoraConfig
        init_r = options.pop("init_r", None) or max(config.rank + 1, math.ceil(1.5 * config.rank))
        if init_r <= config.rank:
            raise ValueError(f"AdaLoRA's init_r ({init_r}) must exceed method.rank ({config.rank}), the target "
                             "average rank it prunes down to")
        total = options.pop("total_step", None) or total_steps or ADALORA_PLACEHOLDER_STEPS
        schedule = _adalora_schedule(options, int(total))
        options.pop("tinit", None), options.pop("tfinal", None)
        kwargs = {"target_r": config.rank, "init_r": init_r, "lora_alpha": config.alpha,
                  "lora_dropout": config.dropout, **schedule}
    elif config.method == "vera":
        cls = peft.VeraConfig
        kwargs = {"r": config.rank, "vera_dropout": config.dropout}
    else:
        raise ValueError(f"method {config.method!r} is not PEFT-backed; those are: {', '.join(PEFT_METHODS)}")
    try:
        return cls(**{**common, **kwargs, **options})
    except TypeError as err:
        import dataclasses

        valid = sorted(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"method.peft_options {sorted(options)} do not fit {cls.__name__} ({err}); valid: {valid}") \
            from err


def inject(model: nn.Module, config: AdapterConfig) -> None:
    """Inject the PEFT method of `config` into `model` in place (parameters frozen except the adapters)."""
    peft = _peft(config.method)
    tuner_class = {"dora": peft.LoraModel, "adalora": peft.AdaLoraModel, "vera": peft.VeraModel}[config.method]
    settings = peft_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "fan_in_fan_out is set to False but the target module is Conv1D"
        tuner = tuner_class(model, settings, ADAPTER_NAME)
    # float32 adapter weights in a float16 / bfloat16 model, as PEFT's own get_peft_model does (and kasa's blocks):
    # AdamW keeps its moments in the weights' dtype, where float16's underflow. PEFT's layers cast their inputs.
    peft.tuners.tuners_utils.cast_adapter_dtype(model, ADAPTER_NAME)
    # AdaLoRA's `ranknum` is a constant it divides by; PEFT's moves and casts of a half-precision model's adapters
    # make it a new, trainable Parameter (AdamW then drifted it, and the checkpoint held it in bf16 runs only)
    for name, param in model.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(False)
    # Not a submodule: the tuner holds the model, so registering it would make a cycle in state_dict().
    model.__dict__[TUNER_ATTRIBUTE] = tuner
    tuner.kasa_schedule_fixed = config.method != "adalora" or bool(config.peft_options.get("total_step"))


def tuner_of(model: nn.Module) -> Any | None:
    """The PEFT tuner of `model` (or of the model inside a DDP-style wrapper), None for every other model."""
    tuner = model.__dict__.get(TUNER_ATTRIBUTE)
    if tuner is None:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            tuner = inner.__dict__.get(TUNER_ATTRIBUTE)
    return tuner


def configure_schedule(model: nn.Module, total_steps: int) -> None:
    """Fix AdaLoRA's budget schedule for a training run of `total_steps` optimiser steps (a no-op otherwise)."""
    tuner = tuner_of(model)
    if tuner is None or not hasattr(tuner, "rankallocator"):
        return
    settings = tuner.peft_config[ADAPTER_NAME]
    options = _options(model)
    schedule = _adalora_schedule(options, int(options.get("total_step") or total_steps))
    settings.tinit, settings.tfinal = schedule["tinit"], schedule["tfinal"]
    tuner.rankallocator.set_total_step(schedule["total_step"])  # the allocator reads the same config object
    tuner.kasa_schedule_fixed = True


def _options(model: nn.Module) -> dict[str, Any]:
    for candidate in (model, getattr(model, "module", None)):
        config = getattr(candidate, CONFIG_ATTRIBUTE, None) if isinstance(candidate, nn.Module) else None
        if config is not None:
            return dict(config.peft_options)
    return {}


def after_optimizer_step(model: nn.Module, step: int, total_steps: int | None = None) -> None:
    """Call after each optimiser step, before the gradients are zeroed, with the 0-based index of that step: steps
    AdaLoRA's rank budget (scores, masks); does nothing for every other method. `total_steps` fixes the schedule
    on the first call unless `configure_schedule` (or peft_options.total_step) already did."""
    tuner = tuner_of(model)
    if tuner is None or not hasattr(tuner, "rankallocator"):
        return
    if not tuner.kasa_schedule_fixed:
        if total_steps is None:
            raise ValueError("AdaLoRA needs the number of training steps: pass total_steps to after_optimizer_step, "
                             "call kasa.adapters.configure_schedule(model, total_steps) first, or set "
                             "method.peft_options.total_step")
        configure_schedule(model, total_steps)
    if any(p.grad is None for name, p in tuner.model.named_parameters() if "lora_" in name and p.requires_grad):
        # PEFT's rank allocator multiplies by the gradients: without them it failed with a TypeError inside PEFT
        raise ValueError("AdaLoRA's rank budget reads the adapters' gradients: call after_optimizer_step after "
                         "optimizer.step() and before optimizer.zero_grad()")
    _recover_final_budget(tuner, step)
    tuner.update_and_allocate(step)


def _recover_final_budget(tuner: Any, step: int) -> None:
    """In the final phase PEFT masks by a rank pattern chosen from its importance averages, which a resume lacks
    where the checkpoint did not keep them (kasa before it saved `allocator_state`), or where resume_allow_changes
    moved the final phase's start (PEFT clears the averages there): PEFT then failed with a KeyError or on a None
    pattern. They are taken from this step's gradients instead; the adapters' masked values are already zero, so
    they keep the lowest scores."""
    settings, allocator = tuner.peft_config[ADAPTER_NAME], tuner.rankallocator
    final = settings.total_step - settings.tfinal
    if step < final or (allocator.exp_avg_ipt and step == final) or (settings.rank_pattern and step > final):
        return
    allocator.update_ipt(tuner.model)
    if step > final:
        settings.rank_pattern = allocator.mask_to_budget(tuner.model, allocator.target_bgt)


def allocator_state(model: nn.Module) -> dict[str, Any] | None:
    """AdaLoRA's rank allocator as a resumable checkpoint keeps it: the importance averages its budget masks are
    chosen by and, from the final phase on, the rank pattern every step masks with (PEFT keeps neither in the adapter
    weights). None for every other method."""
    tuner = tuner_of(model)
    if tuner is None or not hasattr(tuner, "rankallocator"):
        return None
    allocator = tuner.rankallocator
    averages = {name: {key: tensor.detach().cpu() for key, tensor in getattr(allocator, name).items()}
                for name in ALLOCATOR_AVERAGES}
    return {**averages, "rank_pattern": tuner.peft_config[ADAPTER_NAME].rank_pattern}


def load_allocator_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back what `allocator_state` returned, onto the devices of the adapters it scores."""
    tuner = tuner_of(model)
    devices = {name: p.device for name, p in tuner.model.named_parameters()}
    for name in ALLOCATOR_AVERAGES:
        setattr(tuner.rankallocator, name, {key: t.to(devices[key]) for key, t in state[name].items()})
    tuner.peft_config[ADAPTER_NAME].rank_pattern = state["rank_pattern"]


def aux_loss(tuner: Any) -> Any | None:
    """AdaLoRA's orthogonal regularisation, orth_reg_weight * mean ||P^T P - I|| + ||Q Q^T - I|| over its matrices,
    as a kasa AuxLoss (per module: l2 = sum(E^2), logged only; l3_u = ||P^T P - I||_F, l3_v = ||Q Q^T - I||_F).
    None for the other PEFT methods, or when orth_reg_weight is 0."""
    if not hasattr(tuner, "rankallocator"):
        return None
    weight = tuner.peft_config[ADAPTER_NAME].orth_reg_weight
    if not weight:
        return None
    from peft.tuners.adalora import AdaLoraLayer

    modules: dict[str, Regularization] = {}
    for name, layer in tuner.model.named_modules():
        if not isinstance(layer, AdaLoraLayer) or ADAPTER_NAME not in layer.lora_A:
            continue
        a, b, e = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME], layer.lora_E[ADAPTER_NAME]
        gram_a, gram_b = a @ a.T, b.T @ b
        eye_a = torch.eye(gram_a.shape[0], device=a.device, dtype=a.dtype)
        eye_b = torch.eye(gram_b.shape[0], device=b.device, dtype=b.dtype)
        modules[name] = Regularization(e.detach().square().sum(), torch.linalg.matrix_norm(gram_b - eye_b),
                                       torch.linalg.matrix_norm(gram_a - eye_a))
    if not modules:
        return None
    terms = Regularization(*map(torch.stack, zip(*modules.values())))
    l3 = (terms.l3_u + terms.l3_v).mean()
    # PEFT averages over the 2 * count matrices
    return AuxLoss(weight * l3 / 2, terms.l2.mean(), l3, list(modules), list(range(len(modules))), terms)


def projection_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen tensors an adapter checkpoint needs besides the trainable ones: VeRA's shared projections (once each)."""
    if tuner_of(model) is None:
        return {}
    return {name: buf for name, buf in model.named_buffers() if any(p in name for p in PROJECTION_BUFFERS)}


def merge(model: nn.Module) -> None:
    tuner_of(model).merge_adapter()


def unmerge(model: nn.Module) -> None:
    tuner_of(model).unmerge_adapter()


def merge_and_unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """The model's own layers back in place, with the adapters merged into them (merge=False: dropped)."""
    tuner = tuner_of(model)
    tuner.merge_and_unload() if merge else tuner.unload()
    del model.__dict__[TUNER_ATTRIBUTE]
    if "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]
    return model
