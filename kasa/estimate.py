"""Will a run fit? The peak memory of one training process, from the model's architecture alone (config.json),
never its weights.

The model is built on the meta device (shapes, no storage) with the run's adapters injected by the same code as
training (`apply_adapters(..., initialise=False)`), so parameter counts are exact. Per process:

  weights       every parameter and buffer in its dtype; with model.quantization the layers `quantize_base` would
                replace count what bitsandbytes stores (4-bit values with 8-bit block scales, or int8 with row scales)
  adapters      trainable adapter/head parameters, and the removed singular triplets the truncating methods keep
                (buffers: they make reloading exact and SVD-free)
  gradients     one per trainable parameter, in its dtype (DDP adds its bucket copy)
  optimizer     AdamW's two moments per trainable parameter
  activations   what autograd saves for backward, traced on the meta device through one and two decoder layers
                (the rest is linear in the depth) for batch x max_length; fused attention (SDPA) saves q, k, v,
                the output and the log-sum-exp, as the CUDA kernels do. The CPU's fused kernel cannot drop out:
                with attention dropout in training, SDPA on the CPU takes the math path, which saves the
                batch x heads x length x length probabilities and dropout mask (`device="cpu"` counts those).
                With gradient checkpointing each layer keeps its input and one layer is recomputed at a time.
                Under autocast (trainer.precision bf16 / fp16 over weights of another dtype) the linear layers and
                attention are traced in its dtype: the copies of the frozen weights that autocast makes at each
                call and the matmul's backward keeps count too (one layer's with checkpointing).
  transient     the largest temporaries on top of what is saved: backward's, twice the largest saved tensor, or
                the chunked causal-LM loss's one chunk of logits (kasa.tasks.lm_loss) at the end of forward

The causal-LM loss is traced as kasa computes it (the same function): the language-model head runs only at the
columns that predict a labelled token, chunked where the model allows it (kasa.tasks.lm_loss: what it keeps is the
gradient with respect to the hidden states), else with float32 log-probabilities of those columns. How many columns
that is depends on the data (prompts carry no loss): `loss_share` is the share of the max_length columns counted, 1.0
by default (every column: an upper bound); the response share of the data makes the estimate close (e.g. 0.35 for
Alpaca rows of 256 tokens, where about a third of the columns predict a response token).

ZeRO-2 shards gradients and optimizer states over the processes, ZeRO-3 and FSDP also the weights. Not counted:
evaluation and generation (smaller than a training step), the CUDA context and allocator slack, which the fit
verdict leaves as a reserve (RESERVE_BYTES).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30
RESERVE_BYTES = GIB  # CUDA context (~0.5 GiB) and allocator fragmentation, kept free by the fit verdict
SHARDINGS = ("none", "zero2", "zero3", "fsdp")
# estimate_memory's "bytes" that a process holds throughout a step, whatever its micro-batch
STATIC_PARTS = ("weights", "gathered_weights", "adapters", "removed_components", "gradients", "optimizer")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision -> Accelerate's autocast dtype
ARCHITECTURES = Path(__file__).parent / "architectures"


def shipped_architecture(name: str) -> Path:
    """The config.json kasa ships for a recipe's model (kasa/architectures/<org>--<name>.json)."""
    return ARCHITECTURES / f"{name.replace('/', '--')}.json"


def load_architecture(model_cfg) -> Any:
    """The model's transformers config: from model.path (config.json or the GGUF header), the copy kasa ships
    for its recipes' models, or the Hub."""
    from transformers import AutoConfig

    from kasa.tasks.models import check_model_folder

    kwargs = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}  # a GGUF repo has no config.json
    if model_cfg.path:
        check_model_folder(model_cfg)  # as kasa-train says it, not as transformers' message about a bad Hub repo id
        try:
            return AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the architecture from model.path={model_cfg.path!r} "
                             f"({str(err).splitlines()[0]}): pass a folder with config.json") from err
    shipped = shipped_architecture(model_cfg.name)
    if shipped.is_file():
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    except OSError as err:
        raise ValueError(f"cannot read the architecture of {model_cfg.name!r} ({str(err).splitlines()[0]}): "
                         "pass model.path=<folder with its config.json>") from err


def loss_share_of(labels: torch.Tensor, max_length: int) -> float:
    """`loss_share` of a causal-LM batch: its columns that predict a labelled token (where kasa runs the head),
    over max_length."""
    from kasa.tasks.lm_loss import loss_positions

    return len(loss_positions(labels)["loss_columns"]) / max_length


def _meta_model(cfg, architecture) -> nn.Module:
    """The run's model with its adapters, on the meta device."""
    from kasa.adapters import apply_adapters
    from kasa.tasks.models import DTYPES, task_auto_class

    dtype = DTYPES[cfg.model.dtype]
    architecture = copy.deepcopy(architecture)
    factory = task_auto_class(cfg, architecture)
    with torch.device("meta"):
        model = factory.from_config(architecture, dtype=dtype, attn_implementation="eager"
                                    if getattr(cfg.model, "attn_implementation", "sdpa") == "eager" else "sdpa")
    apply_adapters(model, cfg.method, initialise=False)
    return model


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while tracing: the output's shape, and for backward exactly
    what the fused kernels keep (q, k, v, the output and a float32 log-sum-exp per query and head)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query[..., : value.shape[-1]])
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace only records what forward saves
        raise NotImplementedError


def _autocast(cfg, model: nn.Module) -> tuple[torch.dtype, set[int]] | None:
    """Accelerate's autocast dtype for trainer.precision, and the weights of the layers it leaves alone (the ones
    quantize_base replaces: bitsandbytes' own kernels); None without autocast."""
    from kasa.adapters.quantized import quantizable_layers

    dtype = AUTOCAST_DTYPES.get(cfg.trainer.precision)
    if dtype is None:
        return None
    quantized = quantizable_layers(model, cfg.method.trainable_modules) if cfg.model.quantization else []
    return dtype, {id(module.weight) for _, module in quantized}


def _saved_bytes(model: nn.Module, batch: int, length: int, loss_columns: int | None, chunked: bool = True,
                 device: str = "cuda", autocast: tuple[torch.dtype, set[int]] | None = None) -> tuple[int, int]:
    """(total, largest) bytes of the distinct tensors autograd saves for backward in one training forward:
    a classifier's (loss_columns None) or a causal LM's with its head and loss at `loss_columns` columns, with the
    attention kernels of `device` (module docstring); under `autocast` (its dtype, and the weights it leaves alone)
    as autocast runs it, which the meta device cannot: the linear layers and attention in that dtype, so that a
    frozen weight's copy, made at each call and kept for the matmul's backward, counts."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from transformers import PreTrainedModel

    from kasa.tasks.lm_loss import LOSS_POSITION_KEYS, labelled_token_loss

    sizes: dict[int, int] = {}
    # A layer saves its weight for backward too; weights are counted once, as weights, not as activations.
    weights = {StorageWeakRef(t.untyped_storage()).cdata for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = StorageWeakRef(storage).cdata
        if key not in weights:
            sizes[key] = storage.nbytes()
        return tensor

    sdpa, linear, addmm = torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.linear, torch.addmm
    dtype, left_alone = autocast if autocast is not None else (None, set())

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if dtype is None or tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        return tensor.to(dtype)

    def autocast_linear(input, weight, bias=None):
        if id(weight) in left_alone:
            return linear(input.to(weight.dtype), weight, bias)
        return linear(cast(input), cast(weight), cast(bias))

    def autocast_addmm(input, mat1, mat2, **kwargs):  # GPT-2's Conv1D
        return addmm(cast(input), cast(mat1), cast(mat2), **kwargs)

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        query, key, value = cast(query), cast(key), cast(value)
        if device == "cpu" and dropout_p > 0:  # the math path, as the CPU runs it
            return torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p,
                                                                     is_causal, None, **kwargs)[0]
        if key.shape[1] != query.shape[1] and kwargs.get("enable_gqa"):
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        return _FusedAttention.apply(query, key, value)

    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    model.train()
    if model.config.pad_token_id is None:  # a decoder's classifier finds each row's last token by it
        model.config.pad_token_id = 0
    padding_check = PreTrainedModel.warn_if_padding_and_no_attention_mask  # an encoder's would read token values
    PreTrainedModel.warn_if_padding_and_no_attention_mask = lambda *args: None
    torch.nn.functional.scaled_dot_product_attention = fused
    if dtype is not None:
        torch.nn.functional.linear, torch.addmm = autocast_linear, autocast_addmm
    from torch.fx.experimental import _config as fx_config

    try:  # DeBERTa's relative positions call nonzero(), whose size the meta device cannot know: all count
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if loss_columns is None:
                model(input_ids=ids, labels=torch.zeros(batch, dtype=torch.long, device="meta"))
            else:  # kasa's causal-LM loss, by kasa's code: every row labelled at the first loss_columns columns
                tokens = torch.arange(batch * loss_columns, device="meta")
                positions = dict(zip(LOSS_POSITION_KEYS, (tokens[:loss_columns], tokens, tokens)))
                labelled_token_loss(model, {"input_ids": ids}, positions, chunked=chunked)
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(f"cannot trace {type(model).__name__} on the meta device ({str(err).splitlines()[0]}): "
                         "its activations cannot be estimated") from err
    finally:
        PreTrainedModel.warn_if_padding_and_no_attention_mask = padding_check
        torch.nn.functional.scaled_dot_product_attention = sdpa
        torch.nn.functional.linear, torch.addmm = linear, addmm
    return sum(sizes.values()), max(sizes.values(), default=0)


@dataclasses.dataclass
class Activations:
    saved: int  # without checkpointing
    saved_checkpointed: int  # with gradient checkpointing
    transient: int  # the largest temporaries on top of either
    loss: str | None = None  # a causal LM's loss: "chunked" or "plain" (kasa.tasks.lm_loss); None for a classifier


def activation_bytes(cfg, architecture, batch: int, length: int, loss_share: float = 1.0,
                     device: str = "cuda") -> Activations:
    """Saved activations of batch x length from traces of a 1- and a 2-layer copy of the architecture; a causal
    LM's loss over `loss_share` of the columns; `device`'s attention kernels."""
    from kasa.tasks.lm_loss import chunk_workspace_bytes, chunkable_head

    loss_columns = None if cfg.task.kind == "glue" else max(1, round(loss_share * length))
    chunked = not cfg.trainer.compile
    totals, largest, workspace, loss = [], 0, 0, None
    for layers in (1, 2):
        small = copy.deepcopy(architecture)
        small.num_hidden_layers = layers
        model = _meta_model(cfg, small)
        total, big = _saved_bytes(model, batch, length, loss_columns, chunked, device, _autocast(cfg, model))
        totals.append(total)
        largest = max(largest, big)
        if loss_columns is not None:
            loss = "chunked" if chunked and chunkable_head(model) is not None else "plain"
        if loss == "chunked":
            workspace = chunk_workspace_bytes(batch * loss_columns, architecture.hidden_size,
                                              model.get_output_embeddings().weight.shape[0], _dtype(cfg))
    per_layer = totals[1] - totals[0]
    outside = totals[0] - per_layer
    depth = architecture.num_hidden_layers
    dtype_size = torch.empty(0, dtype=_dtype(cfg)).element_size()
    layer_input = batch * length * architecture.hidden_size * dtype_size
    return Activations(saved=outside + depth * per_layer,
                       saved_checkpointed=outside + depth * layer_input + per_layer,
                       transient=max(2 * largest, workspace), loss=loss)


def _dtype(cfg) -> torch.dtype:
    from kasa.tasks.models import DTYPES

    return DTYPES[cfg.model.dtype]


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def static_bytes(model: nn.Module, cfg) -> dict[str, int]:
    """Weights (quantized where model.quantization says), adapter parameters and buffers, gradients, AdamW."""
    from kasa.adapters.model import adapted_layers
    from kasa.adapters.quantized import quantizable_layers, quantized_bytes

    adapter_params, removed = set(), 0
    for _, layer in adapted_layers(model):
        adapter_params |= {id(p) for p in layer.adapters.parameters()}
        removed += sum(_bytes(b) for b in layer.adapters.buffers())
    quantized_weights: dict[int, int] = {}
    if cfg.model.quantization:
        for _, module in quantizable_layers(model, cfg.method.trainable_modules):
            out_features, in_features = module.weight.shape
            if type(module).__name__ == "Conv1D":
                in_features, out_features = out_features, in_features
            quantized_weights[id(module.weight)] = quantized_bytes(out_features, in_features, cfg.model.quantization)
    weights = trainable = 0
    trainable_params = 0
    for param in model.parameters():
        if param.requires_grad:
            trainable += _bytes(param)
            trainable_params += param.numel()
        elif id(param) not in adapter_params:
            weights += quantized_weights.get(id(param), _bytes(param))
    buffers = sum(_bytes(b) for b in model.buffers()) - removed
    return {"weights": weights + buffers, "trainable": trainable, "removed": removed,
            "gradients": trainable, "optimizer": 2 * trainable, "trainable_params": trainable_params}


def gathered_bytes(model: nn.Module) -> int:
    """What a process holds whole at once, beyond its shard, when ZeRO-3 or FSDP shard the weights: the embeddings
    and the LM head (the root unit: gathered across forward, and again in backward) and two blocks (the one running,
    the next one prefetched), the model's largest `_no_split_modules` block."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    largest = max((sum(_bytes(p) for p in module.parameters()) for module in model.modules()
                   if type(module).__name__ in blocks), default=0)
    ends = {id(p): _bytes(p) for embedding in (model.get_input_embeddings(), model.get_output_embeddings())
            if embedding is not None for p in embedding.parameters()}  # a tied head counted once
    return sum(ends.values()) + 2 * largest


def estimate_memory(cfg, num_processes: int = 1, sharding: str = "none", architecture: Any = None,
                    loss_share: float = 1.0, device: str = "cuda") -> dict[str, Any]:
    """Peak memory of one training process of the run `cfg` (a validated kasa.config.RunConfig), in bytes; a causal
    LM's loss counted over `loss_share` of the columns; on a GPU, or with `device="cpu"` as the CPU runs attention
    (module docstring)."""
    from kasa.adapters.model import count_parameters
    from kasa.adapters.quantized import check_quantization
    from kasa.training.preflight import check_new_head_trains

    if not 0 < loss_share <= 1:
        raise ValueError(f"loss_share must be in (0, 1], got {loss_share}: the share of the columns that predict a "
                         "labelled token, e.g. loss_share=0.35")
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding={sharding!r}; choose one of: {', '.join(SHARDINGS)}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    check_quantization(cfg.model.quantization, cfg.method.method, sharded=sharding != "none")  # as kasa-train would
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    architecture = architecture if architecture is not None else load_architecture(cfg.model)
    model = _meta_model(cfg, architecture)
    check_new_head_trains(cfg, model, architecture)  # a run kasa-train would refuse has no peak to tell
    counts = count_parameters(model)
    parts = static_bytes(model, cfg)
    shards = num_processes if sharding != "none" else 1
    weights = parts["weights"] / (shards if sharding in ("zero3", "fsdp") else 1)
    gathered = gathered_bytes(model) * (shards - 1) / shards if sharding in ("zero3", "fsdp") else 0
    trainable = parts["trainable"] / (shards if sharding in ("zero3", "fsdp") else 1)
    gradients = parts["gradients"] / shards
    if sharding == "none" and num_processes > 1:
        gradients *= 2  # DDP's communication buckets hold a second copy of the gradients
    optimizer = parts["optimizer"] / shards
    acts = activation_bytes(cfg, architecture, cfg.trainer.batch_size, cfg.trainer.max_length, loss_share, device)
    static = dict(zip(STATIC_PARTS, map(int, (weights, gathered, trainable, parts["removed"], gradients, optimizer))))
    peak_plain = _peak(static, acts, checkpointing=False)
    peak_checkpointed = _peak(static, acts, checkpointing=True)
    checkpointing = bool(cfg.model.gradient_checkpointing)
    return {
        "parameters": counts.total,
        "trainable_parameters": counts.trainable,
        "adapter_parameters": counts.adapter,
        "dtype": cfg.model.dtype,
        "quantization": cfg.model.quantization,
        "num_processes": num_processes,
        "sharding": sharding,
        "batch_size": cfg.trainer.batch_size,
        "max_length": cfg.trainer.max_length,
        "gradient_checkpointing": checkpointing,
        "loss_share": loss_share,
        "loss": acts.loss,
        "bytes": {
            **static,
            "activations": int(acts.saved),
            "activations_checkpointed": int(acts.saved_checkpointed),
            "backward_transient": int(acts.transient),
        },
        "peak_bytes": int(peak_checkpointed if checkpointing else peak_plain),
        "peak_bytes_without_checkpointing": int(peak_plain),
        "peak_bytes_with_checkpointing": int(peak_checkpointed),
    }


def _peak(static: dict[str, int], acts: Activations, checkpointing: bool) -> int:
    """The peak: what a process holds throughout (`static`, estimate_memory's first parts) plus a step's
    activations and backward's temporaries."""
    return sum(static.values()) + (acts.saved_checkpointed if checkpointing else acts.saved) + acts.transient


def _peak_at_batch(cfg, estimate: dict[str, Any], batch: int, architecture: Any, loss_share: float) -> int:
    """`estimate`'s peak (of the run `cfg`) with micro-batches of `batch` rows: the activations traced again, since
    the chunked loss's chunk and backward's temporaries do not shrink in proportion to the batch."""
    if batch == cfg.trainer.batch_size:
        return estimate["peak_bytes"]
    static = {key: estimate["bytes"][key] for key in STATIC_PARTS}
    acts = activation_bytes(cfg, architecture, batch, cfg.trainer.max_length, loss_share)
    return _peak(static, acts, bool(cfg.model.gradient_checkpointing))


def suggestions(cfg, estimate: dict[str, Any], gpu_bytes: int, num_processes: int = 1,
                sharding: str = "none", loss_share: float = 1.0) -> list[tuple[str, int]]:
    """Overrides that would make the run fit `gpu_bytes`, each with its estimated peak: gradient checkpointing,
    an nf4 base, smaller micro-batches with gradient accumulation (same global batch), and their combinations."""
    from kasa.adapters.quantized import QUANTIZABLE_METHODS

    budget = gpu_bytes - RESERVE_BYTES
    options: list[tuple[list[str], Any]] = [([], cfg)]
    if not cfg.model.gradient_checkpointing:
        options.append((["model.gradient_checkpointing=true"], _with(cfg, model={"gradient_checkpointing": True})))
    if cfg.model.quantization is None and cfg.method.method in QUANTIZABLE_METHODS and sharding == "none":
        options += [(o + ["model.quantization=nf4"], _with(c, model={"quantization": "nf4"})) for o, c in options]
    found = []
    architecture = load_architecture(cfg.model)
    for overrides, option in options:
        result = estimate if not overrides else estimate_memory(option, num_processes, sharding, architecture,
                                                                loss_share)
        batch, accum = cfg.trainer.batch_size, cfg.trainer.grad_accum
        while batch >= 1:
            peak = _peak_at_batch(option, result, batch, architecture, loss_share)
            if peak <= budget:
                extra = [] if batch == cfg.trainer.batch_size else [
                    f"trainer.batch_size={batch}", f"trainer.grad_accum={accum * cfg.trainer.batch_size // batch}"]
                if overrides or extra:
                    found.append((" ".join(overrides + extra), peak))
                break
            if batch == 1 or cfg.trainer.batch_size % (batch // 2 or 1):
                break
            batch //= 2
    return found


def _with(cfg, **changes: dict[str, Any]):
    new = copy.deepcopy(cfg)
    for section, values in changes.items():
        for key, value in values.items():
            setattr(getattr(new, section), key, value)
    return new


def parse_memory(text: str) -> int:
    """'24GiB', '24GB' (taken as GiB, as GPU vendors mean it), '80G', '16384MiB' -> bytes."""
    units = {"tib": 2**40, "tb": 2**40, "t": 2**40, "gib": GIB, "gb": GIB, "g": GIB, "mib": 2**20, "mb": 2**20,
             "m": 2**20}
    value = str(text).strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if value.endswith(unit):
            try:
                size = float(value[: -len(unit)])
            except ValueError:
                break
            if not (size > 0 and math.isfinite(size)):
                raise ValueError(f"gpu_memory={text!r} is not allowed: the size must be a number > 0, e.g. "
                                 "gpu_memory=24GiB")
            if size * units[unit] <= RESERVE_BYTES:  # nothing would be left for the run
                raise ValueError(f"gpu_memory={text!r} is not allowed: the size must exceed the "
                                 f"{RESERVE_BYTES / GIB:g} GiB that the verdict keeps for the CUDA context, e.g. "
                                 "gpu_memory=24GiB")
            return int(size * units[unit])
    raise ValueError(f"gpu_memory={text!r} is not a memory size: write e.g. gpu_memory=24GiB or gpu_memory=80GB")
