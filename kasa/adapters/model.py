"""Applying a method to a model by target module names, and what acts on all adapted layers at once: the
auxiliary loss, merging, parameter counts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from kasa.adapters import peft_baselines
from kasa.adapters.calibration import ModelInputs, batch_inputs, moment_groups
from kasa.adapters.config import CONFIG_ATTRIBUTE, AdapterConfig
from kasa.adapters.kasa import AuxLoss, KasaBlock, batched_regularization, weighted_total
from kasa.adapters.layer import SUPPORTED_LAYERS, AdaptedLayer, weight_matrix
from kasa.adapters.lora import LoraBlock
from kasa.adapters.methods import METHOD_TABLE
from kasa.adapters.quantized import (
    PENDING_ATTRIBUTE,
    check_quantization,
    is_quantized_layer,
    logical_numel,
    quantize_pending,
)
from kasa.adapters.truncation import singular_components

BLOCKS_ATTRIBUTE = "kasa_blocks"  # [(name, KasaBlock)]: the list _regularized_blocks keeps


def _set_config(model: nn.Module, config: AdapterConfig | None) -> None:
    """Mark `model` as adapted with `config` (None: no longer adapted), dropping the block list kept for the old."""
    setattr(model, CONFIG_ATTRIBUTE, config)
    model.__dict__.pop(BLOCKS_ATTRIBUTE, None)


def module_matches(module_name: str, target: str) -> bool:
    """Whether `target` of target_modules / trainable_modules names this module: its whole name or its last parts."""
    return module_name == target or module_name.endswith("." + target)


def _block_class(config: AdapterConfig) -> type:
    return {"kasa": KasaBlock, "lora": LoraBlock}[METHOD_TABLE[config.method].block]


def _parse_targets(config: AdapterConfig) -> dict[str, list[str] | None]:
    """target name -> fused parts to adapt (None: the whole output)."""
    targets: dict[str, list[str] | None] = {}
    for target in config.target_modules:
        head, _, part = target.rpartition(".")
        if head and head.split(".")[-1] in config.fused_modules:
            parts = config.fused_modules[head.split(".")[-1]]
            if part not in parts:
                raise ValueError(f"target {target!r}: {part!r} is not a part of {head!r}; its parts are {parts}")
            targets.setdefault(head, []).append(part)  # type: ignore[union-attr]
        else:
            targets[target] = None
    return targets


def apply_adapters(model: nn.Module, config: AdapterConfig, initialise: bool = True,
                   calibration: Iterable[dict[str, torch.Tensor]] | None = None,
                   calibration_inputs: ModelInputs = batch_inputs) -> nn.Module:
    """Freeze `model` and adapt it in place with `config`; returns the same model.

    With `initialise=False` the adapter blocks are created empty and the base weights untouched: `load_adapter`
    fills them from a checkpoint instead of decomposing the weights again. `config.truncation_basis="activation"`
    needs `calibration`: batches (dicts with input_ids, a 2-D attention_mask marking the tokens that count, and any
    other model inputs; a list, or a DataLoader, read once) whose inputs to the adapted modules give the second
    moments (kasa.adapters.calibration). Every batch given counts: `config.calibration_samples` is the number of
    examples that kasa-train and kasa-inspect put in them.
    `calibration_inputs` turns a batch into the model's inputs: by default its input_ids, attention_mask,
    token_type_ids and position_ids; kasa's training gives its task's (packed examples kept apart)."""
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"config must be a kasa.AdapterConfig, got {type(config).__name__}: build it with "
                         "kasa.AdapterConfig(method=..., ...) or AdapterConfig.from_dict(settings)")
    if getattr(model, CONFIG_ATTRIBUTE, None) is not None:
        raise ValueError("this model already has adapters applied; load a fresh base model")
    if calibration is not None and not isinstance(calibration, Sequence):  # a DataLoader: read once, used per group
        calibration = list(calibration)
    check_quantization(getattr(model, PENDING_ATTRIBUTE, None), config.method)
    _check_names(model, config)  # before anything changes: a truncation cannot be undone
    known = {id(module) for module in model.modules()}
    if initialise and config.truncation_basis == "activation" and not calibration:
        raise ValueError("truncation_basis=activation needs calibration batches: "
                         "apply_adapters(model, config, calibration=[batch, ...])")
    with unchanged_on_error(model):
        _adapt(model, config, initialise, calibration, calibration_inputs)
    if initialise:  # a quantized base is the truncated one, W0 - removed (load_adapter quantizes after truncating)
        quantize_pending(model, config.method, config.trainable_modules)
    _new_modules_follow_mode(model, known)
    return model


def _new_modules_follow_mode(module: nn.Module, known: set[int]) -> None:
    """The modules the adapters added take the training mode of the module they sit in: an nn.Module starts in
    training mode, and a model in eval mode (as from_pretrained returns it) applied the adapters' dropout."""
    for child in module.children():
        if id(child) not in known:
            child.training = module.training
        _new_modules_follow_mode(child, known)


@contextlib.contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Adapters that fail to apply (no target matches, a rank too large, calibration batches it cannot read, a
    checkpoint that does not fit) leave `model` as it was given: its own layers in place and the parameters that
    trained training again, so it can be adapted again. Not once a truncation has begun (the layers are swapped in
    as their base weights are truncated, last): that cannot be undone exactly."""
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    try:
        yield
    except BaseException:
        if any(layer.truncated for _, layer in adapted_layers(model)):
            raise
        merge_and_unload(model, merge=False)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable.get(name, False))
        raise


def _adapt(model: nn.Module, config: AdapterConfig, initialise: bool,
           calibration: Sequence[dict[str, torch.Tensor]] | None, calibration_inputs: ModelInputs) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    elif config.method == "bitfit":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    elif config.uses_peft:  # DoRA, AdaLoRA, VeRA through PEFT (always initialised: load_adapter overwrites them)
        peft_baselines.inject(model, config)
    else:
        _inject_layers(model, config, initialise, calibration, calibration_inputs)
    _unfreeze(model, config.trainable_modules)
    if config.method == "bitfit" and not any(param.requires_grad for param in model.parameters()):
        raise ValueError("method=bitfit trains the model's bias terms, and this model has none (nor a trained head): "
                         "choose another method, e.g. method=lora")
    _set_config(model, config)


def target_layers(model: nn.Module, config: AdapterConfig) -> dict[str, tuple[nn.Module, list[str] | None]]:
    """The layers `config.target_modules` select: name -> (layer, fused parts to adapt or None for the whole); each
    name matches a module (`_check_names`, before it)."""
    targets = _parse_targets(config)
    # module name -> (module, parts); a module that several targets match (`query` and `self.query`) is adapted once
    matched: dict[str, tuple[nn.Module, list[str] | None]] = {}
    for name, module in model.named_modules():
        for target, parts in targets.items():
            if not module_matches(name, target):
                continue
            if name not in matched:
                matched[name] = (module, None if parts is None else list(parts))
                continue
            known = matched[name][1]
            if (known is None) != (parts is None):
                raise ValueError(f"module {name!r} is targeted both as a whole and by its fused parts")
            if known is not None:
                known.extend(part for part in parts if part not in known)
    shared = {}  # parameter -> the names it has: tied weights (an output embedding tied to the input's) have two
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    for name, (module, _) in matched.items():
        if not isinstance(module, SUPPORTED_LAYERS):
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}; adapters apply to nn.Linear and Conv1D layers only"
            )
        if is_quantized_layer(module):
            raise ValueError(f"module {name!r} is already quantized: call quantize_base after apply_adapters, "
                             "which quantizes the base that the adapters leave (the truncated weights)")
        tied = [other for other in shared[id(module.weight)] if other != f"{name}.weight"]
        if tied:
            raise ValueError(f"module {name!r} shares its weight with {tied[0]!r} (tied word embeddings): adapting "
                             f"it would truncate and merge into that one too; leave {name.split('.')[-1]!r} out of "
                             "target_modules")
    return matched


def _inject_layers(model: nn.Module, config: AdapterConfig, initialise: bool,
                   calibration: Sequence[dict[str, torch.Tensor]] | None, calibration_inputs: ModelInputs) -> None:
    block_class = _block_class(config)
    layers: dict[str, tuple[nn.Module, dict]] = {}  # name -> (base layer, {part: (start, stop, block)})
    for name, (module, parts) in target_layers(model, config).items():
        weight = weight_matrix(module)
        n_out, n_in = weight.shape
        ranges = {"weight": (0, n_out)}
        if parts is not None:
            names = config.fused_modules[name.split(".")[-1]]
            if n_out % len(names):
                raise ValueError(f"{name!r} has {n_out} outputs, which do not split into {len(names)} equal parts")
            size = n_out // len(names)
            ranges = {part: (names.index(part) * size, (names.index(part) + 1) * size) for part in parts}
        blocks = {}
        for part, (start, stop) in ranges.items():
            largest = max(config.rank, config.removed_rank)
            if not largest < min(stop - start, n_in):
                raise ValueError(
                    f"rank {largest} (method.rank / method.truncation_rank) must be < min(n, m) = "
                    f"{min(stop - start, n_in)} for {name!r} ({stop - start} x {n_in}): lower it"
                )
            # KaSA's principal init moves the r largest components into the adapter besides removing the k smallest:
            # the two sets must not overlap (checked here, before any decomposition)
            if block_class is KasaBlock and config.init == "principal" and (
                    config.rank + config.removed_rank > min(stop - start, n_in)):
                raise ValueError(
                    f"method.init=principal takes rank + truncation_rank = {config.rank} + {config.removed_rank} "
                    f"singular components out of {name!r} ({stop - start} x {n_in}), more than its min(n, m) = "
                    f"{min(stop - start, n_in)}: lower method.rank or method.truncation_rank"
                )
            blocks[part] = (start, stop, block_class(stop - start, n_in, config).to(weight.device))
        layers[name] = (module, blocks)

    if initialise:
        decompose = partial(
            singular_components, method=config.svd_method, device=config.svd_device, cache_dir=config.svd_cache_dir
        )
        if config.truncation_basis == "activation":
            # The model is still untouched here (layers are swapped in below), so every group's calibration pass
            # sees the original model's inputs.
            modules = {name: module for name, (module, _) in layers.items()}
            for moments in moment_groups(model, modules, calibration, config.calibration_memory_gib,
                                         calibration_inputs):
                for name, input_moments in moments.items():
                    _initialise(layers[name], partial(decompose, moments=input_moments,
                                                      damping=config.calibration_damping))
                del moments, input_moments  # free this group's matrices before the next is gathered
        else:
            for layer in layers.values():
                _initialise(layer, decompose)

    for name, (module, blocks) in layers.items():
        layer = AdaptedLayer(module, blocks, config.dropout)
        if initialise:
            layer.truncate_base()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _initialise(layer: tuple[nn.Module, dict], decompose) -> None:
    module, blocks = layer
    weight = weight_matrix(module)
    for start, stop, block in blocks.values():
        block.initialise(weight[start:stop], decompose)


def _check_names(model: nn.Module, config: AdapterConfig) -> None:
    """Every name of target_modules and trainable_modules is a module of `model`: a misspelled one beside others
    that match ([query, vaule]) would leave its layers unadapted without a word."""
    names = [name for name, _ in model.named_modules()]
    targets = _parse_targets(config) if config.uses_layers else {}

    def linear() -> list[str]:  # for the messages: the names a target may take
        return sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)})

    if config.uses_layers and not targets:  # it froze the whole model and trained nothing
        raise ValueError(f"method={config.method} adapts the modules of target_modules, which is empty: name the "
                         f"layers to adapt; linear layers in this model: {linear()}")
    for target in targets:
        if not any(module_matches(name, target) for name in names):
            raise ValueError(f"no module matches {target!r} of target_modules {config.target_modules}; linear "
                             f"layers in this model: {linear()}")
    for target in config.trainable_modules:
        if not any(module_matches(name, target) for name in names):
            raise ValueError(f"no module matches {target!r} of trainable_modules {config.trainable_modules} "
                             "(kasa-train's model.head_modules, the head trained fully besides the adapters): name "
                             f"this model's head (its top-level modules: {[n for n, _ in model.named_children()]}), "
                             "or train none with model.head_modules=[]")


def _unfreeze(model: nn.Module, names: list[str]) -> None:
    for target in names:
        for name, module in model.named_modules():
            if module_matches(name, target):
                for param in module.parameters():
                    param.requires_grad_(True)
                _train_in_float32(module)


HALF_DTYPES = (torch.float16, torch.bfloat16)
HEAD_ATTRIBUTE = "kasa_float32_head"  # on a head trained in float32: the model's dtype and the two casting hooks


def _train_in_float32(head: nn.Module) -> None:
    """A fully trained head of a float16 / bfloat16 model keeps float32 weights, as the adapter blocks do: AdamW keeps
    its moments in the weights' dtype, where float16's second moments underflow to 0 (gradients of 1e-5: steps of
    2 x lr by the fourth; MiniLM in float16 trained to a higher loss than in float32 by its third step) and
    bfloat16's 8-bit mantissa drops small updates (100 steps of lr 1e-5 left a weight of 0.05 at 0.05, float32 moved
    it to 0.049). Its inputs are cast to its weights' dtype at each call (float32, or whatever an engine that casts
    the model later gives it) and its outputs to the model's dtype, so the layers around it see what they did. Its
    parent, once converted, holds no half-precision weights, so nested heads (a RoBERTa head's `dense`) are converted
    once."""
    half = {p.dtype for p in head.parameters()} & set(HALF_DTYPES)
    if not half or getattr(head, HEAD_ATTRIBUTE, None) is not None:
        return
    model_dtype = half.pop()
    head.float()
    hooks = (head.register_forward_pre_hook(_inputs_to_head_dtype, with_kwargs=True),
             head.register_forward_hook(partial(_outputs_to, model_dtype)))
    setattr(head, HEAD_ATTRIBUTE, (model_dtype, *hooks))


def _restore_heads(model: nn.Module) -> None:
    """Heads back in the model's dtype, without their hooks: the original architecture (merge_and_unload)."""
    for module in model.modules():
        if (converted := getattr(module, HEAD_ATTRIBUTE, None)) is not None:
            model_dtype, *hooks = converted
            for hook in hooks:
                hook.remove()
            module.to(model_dtype)
            setattr(module, HEAD_ATTRIBUTE, None)


def _cast_floats(value: object, dtype: torch.dtype) -> object:
    """`value`'s floating tensors in `dtype`, wherever they sit in it (tuples, lists, dicts, a transformers
    ModelOutput, which keeps its type)."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


def _inputs_to_head_dtype(head: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = next(head.parameters()).dtype
    return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)


def _outputs_to(dtype: torch.dtype, head: nn.Module, args: tuple, output: object) -> object:
    return _cast_floats(output, dtype)


def adapter_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("this model has no adapters: call kasa.apply_adapters first")
    return config


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def kasa_blocks(model: nn.Module) -> Iterator[tuple[str, KasaBlock]]:
    for name, layer in adapted_layers(model):
        for part, block in layer.adapters.items():
            if isinstance(block, KasaBlock):
                yield (name if part == "weight" else f"{name}.{part}"), block


def _regularized_blocks(model: nn.Module) -> list[tuple[str, KasaBlock]]:
    """The model's KaSA blocks that have a regulariser, in its order. The walk over its modules (~5 ms a step for
    SmolLM2's ~2,000) is done once per set of adapters and kept until `_set_config` marks another; a wrapper (DDP,
    torch.compile) is walked each time. Which blocks have a regulariser is read each time: a block's beta and gamma
    may change."""
    blocks = model.__dict__.get(BLOCKS_ATTRIBUTE)
    if blocks is None:
        blocks = list(kasa_blocks(model))
        if model.__dict__.get(CONFIG_ATTRIBUTE) is not None:
            model.__dict__[BLOCKS_ATTRIBUTE] = blocks
    return [(name, block) for name, block in blocks if block.beta or block.gamma]


def aux_loss(model: nn.Module) -> AuxLoss | None:
    """KaSA's auxiliary loss of the model's current adapters (None for methods without one): call it before the
    training forward pass in a single process, after it under torch.distributed (`aux_loss_needs_forward`).

    Under torch.distributed each KaSA block records its terms during forward, so the loss is built from the full
    parameters even when FSDP / ZeRO-3 shard them outside forward; reading the terms clears them. Blocks without a
    record (a single process, evaluation, a reentrant activation checkpoint) are computed from their parameters, all
    at once (batched_regularization).
    For AdaLoRA (PEFT) it is AdaLoRA's orthogonal regularisation."""
    tuner = peft_baselines.tuner_of(model)
    if tuner is not None:
        return peft_baselines.aux_loss(tuner)
    blocks = _regularized_blocks(model)
    if not blocks:
        return None
    order, terms = batched_regularization([block for _, block in blocks])
    row_of = {i: row for row, i in enumerate(order)}
    total = weighted_total([blocks[i][1] for i in order], terms) / len(blocks)
    return AuxLoss(total, terms.l2.mean(), (terms.l3_u + terms.l3_v).mean(), [name for name, _ in blocks],
                   [row_of[i] for i in range(len(blocks))], terms)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter update into its base weight (no extra inference cost); `unmerge_adapters` undoes it."""
    if peft_baselines.tuner_of(model) is not None:
        return peft_baselines.merge(model)
    for _, layer in adapted_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    if peft_baselines.tuner_of(model) is not None:
        return peft_baselines.unmerge(model)
    for _, layer in adapted_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Merge the adapters and put the plain base layers back: a model of the original architecture. merge=False
    drops the adapters instead (`load_adapter` undoing a load that does not fit: the base weights are untouched).
    Heads trained in float32 return to the model's dtype."""
    if peft_baselines.tuner_of(model) is not None:
        _restore_heads(model)
        peft_baselines.merge_and_unload(model, merge)
        _set_config(model, None)
        return model
    layers = list(adapted_layers(model))
    if merge:  # first: a base that cannot take the update (a quantized one) refuses before anything changed
        for _, layer in layers:
            layer.merge()
    _restore_heads(model)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    _set_config(model, None)
    return model


@dataclass
class ParameterCount:
    adapter: int  # parameters of the adapter blocks (the paper's "# trainable parameters")
    trainable: int  # everything that trains: adapters plus heads (and all weights for full fine-tuning)
    total: int


def count_parameters(model: nn.Module) -> ParameterCount:
    adapter_ids = {
        id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters() if p.requires_grad
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(p.numel() for p in model.parameters() if id(p) in adapter_ids)
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is not None and (not config.uses_layers or config.uses_peft):  # what trains outside the task head
        head_ids = {id(p) for t in config.trainable_modules for n, m in model.named_modules() if module_matches(n, t)
                    for p in m.parameters()}
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head_ids)
    return ParameterCount(adapter, trainable, sum(logical_numel(p) for p in model.parameters()))
