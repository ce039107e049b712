"""Loading the base model and tokenizer from the Hub or a local folder, with errors that say what to pass."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator, DistributedType
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from kasa.adapters.quantized import mark_for_quantization
from kasa.config import MODEL_DTYPES, ModelConfig, TaskConfig
from kasa.hub import hub_reachable

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


class ModelLoadError(ValueError):
    pass


@contextlib.contextmanager
def whole_weights(accelerator: Accelerator) -> Iterator[None]:
    """Load models with whole weights under DeepSpeed ZeRO-3 too. Accelerate registers its DeepSpeed config with
    transformers whatever `zero3_init_flag` says, and `from_pretrained` then partitions the weights as it loads them
    (deepspeed.zero.Init); KaSA's truncation needs each whole matrix, and `accelerator.prepare` shards the model
    afterwards. The registration comes back on exit: ZeRO-3 generation relies on it (synced_gpus)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def stop_buffer_broadcast(model: nn.Module) -> None:
    """DDP (`model` as `accelerator.prepare` returned it) broadcasts every buffer from rank 0 before each forward by
    default: here the removed components (r x (n + m) floats per adapted matrix, ~170 MB for a 7-8B model with r 16
    on seven projections; 58 ms a forward over gloo for SmolLM2-135M's 19 MB), which never change. The wrap has
    copied rank 0's buffers to every process once; set here after it, as torch's `forward_sync_buffers=False` would
    (Accelerate passes only the deprecated `broadcast_buffers`, whose False also skips that first copy)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model.forward_sync_buffers = False


def inner_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model inside Accelerate's DDP, FSDP or DeepSpeed wrapper. A single process's model has no wrapper
    (`prepare` wraps only for several processes), and asking Accelerate anyway would import DeepSpeed wherever it is
    installed: 2 s at the first checkpoint or generation of every run."""
    return model if accelerator.distributed_type == DistributedType.NO else accelerator.unwrap_model(model)


def model_source(model: ModelConfig) -> str:
    return model.path or model.name


# A tokenizer's vocabulary, in one of the files transformers builds it from: without any, transformers 5 builds a
# BERT tokenizer of 5 special words from config.json alone (every word [UNK]) and other models fail with a cut-off
# "Couldn't instantiate the backend tokenizer from one of:".
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "spm.model")


def check_tokenizer_files(model: ModelConfig) -> None:
    """A model folder (model.path holding config.json; without a GGUF file, which carries its tokenizer) must hold
    the tokenizer's vocabulary. A path that is no model folder is check_model_folder's to name."""
    if not model.path or model.gguf_file or model.trust_remote_code:  # remote code may build its tokenizer its way
        return
    folder = Path(model.path).expanduser()
    if _is_file(folder / "config.json") and not any(_is_file(folder / name) for name in VOCABULARY_FILES):
        raise ModelLoadError(f"model.path={model.path!r} holds no tokenizer files (one of "
                             f"{', '.join(VOCABULARY_FILES)}): save the tokenizer into it too "
                             "(tokenizer.save_pretrained(folder)), as a model's save_pretrained does not")


def task_auto_class(cfg: Any, architecture: Any) -> type:
    """The transformers auto class that builds a run's model (`cfg`: its RunConfig) without loading it: for a GLUE
    task a sequence classifier, whose labels it sets on `architecture`; else a causal LM."""
    if cfg.task.kind == "glue":
        architecture.num_labels = max(cfg.task.num_labels, 1)
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def check_decoder(config: Any, source: str) -> None:
    """A causal-LM task needs a model whose attention is causal. transformers also maps encoders (BERT, RoBERTa and
    their kin, the models with a masked-LM head) to a ...ForCausalLM class, which unless the config says is_decoder
    attends to the very tokens it is to predict: the loss falls to near nothing and the model learns no language."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ModelLoadError(f"{source} is an encoder ({config.model_type}), whose attention sees the tokens it is to "
                             "predict: a generation task needs a decoder-only causal LM (e.g. model=smollm2_135m, "
                             "model=llama3_8b)")


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    check_tokenizer_files(model)
    kwargs = {"trust_remote_code": model.trust_remote_code}
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    return _from_pretrained(AutoTokenizer, model, **kwargs)


def load_classifier(model: ModelConfig, task: TaskConfig) -> nn.Module:
    """A sequence classification (num_labels > 1) or regression (num_labels == 1) model."""
    return _load_model(
        AutoModelForSequenceClassification,
        model,
        num_labels=task.num_labels,
        problem_type="regression" if task.num_labels == 1 else "single_label_classification",
        ignore_mismatched_sizes=True,  # a checkpoint's own head of another size is replaced: the head is trained
    )


def load_causal_lm(model: ModelConfig) -> nn.Module:
    """A causal language model, placed on this process's GPU while loading when there is one, so that the
    adapters' truncation runs there layer by layer and a 7B model never waits on CPU SVDs. A base to be quantized
    loads on the CPU instead (a 13B model in bf16 does not fit a 24 GB GPU): the truncation still runs on the GPU,
    and each layer moves there as it is quantized."""
    kwargs = {}
    if torch.cuda.is_available() and model.quantization is None:
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().device}
    loaded = _load_model(AutoModelForCausalLM, model, **kwargs)
    check_decoder(loaded.config, model_source(model))  # kasa-train checks it before loading (preflight.check_model)
    return loaded


def _load_model(factory, model: ModelConfig, **kwargs) -> nn.Module:
    kwargs |= {"dtype": DTYPES[model.dtype], "trust_remote_code": model.trust_remote_code,
               "attn_implementation": attention_implementation(model)}
    if model.gguf_file:
        kwargs |= unpacked_gguf(model.gguf_file)
    with gguf_progress_as_transformers() if model.gguf_file else contextlib.nullcontext():
        loaded = _from_pretrained(factory, model, **kwargs)
    # Quantized once the adapters have truncated the float weights (apply_adapters / load_adapter).
    mark_for_quantization(loaded, model.quantization)
    if model.gradient_checkpointing:
        enable_checkpointing(loaded)
    return loaded


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (it runs the adapters' forward with gradients, so KaSA records its terms
    there), through the name the installed transformers has: 5.x renamed gradient_checkpointing_enable to
    activation_checkpointing_enable and warns at every call of the old name."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def unpacked_gguf(gguf_file: str) -> dict:
    """from_pretrained options that load a GGUF file as a plain float model. kasa truncates and adapts float weights,
    and transformers 5 would otherwise keep the quantized blocks wherever a GGUF kernel is installed, and mark even an
    unpacked model as GGUF-quantized, which its save_pretrained (kasa-export's merged model) refuses to write."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # transformers 4 always unpacks a GGUF file into a plain model
        return {"gguf_file": gguf_file}
    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}


@contextlib.contextmanager
def gguf_progress_as_transformers() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar, which ignores transformers' progress-bar switch (kasa's
    commands turn that off, and `logging.progress=false` asks for a quiet log): give it transformers' tqdm, which
    obeys the switch, while a GGUF file loads."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as transformers_logging

    original = getattr(gguf_loading, "tqdm", None)
    if original is None:  # another transformers version: nothing to redirect
        yield
        return
    gguf_loading.tqdm = transformers_logging.tqdm
    try:
        yield
    finally:
        gguf_loading.tqdm = original


def attention_implementation(model: ModelConfig) -> str:
    """model.attn_implementation, checked before a model loads: flash-attention needs its package and a GPU."""
    if model.attn_implementation == "flash_attention_2" and not (
            torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        raise ModelLoadError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn "
                             "package (pip install flash-attn --no-build-isolation); use sdpa otherwise")
    return model.attn_implementation


def hub_options(model: ModelConfig) -> dict[str, bool]:
    """from_pretrained options for `model`: the local cache only, when it comes from an unreachable Hub."""
    return {} if model.path or hub_reachable() else {"local_files_only": True}


def check_model_folder(model: ModelConfig) -> None:
    """model.path must be a folder holding config.json, or model.gguf_file when one is named (a GGUF file carries its
    config): said plainly, naming a subfolder that holds it (a pip model package ships its model in one), rather than
    as transformers' Hub-id or Hub-URL messages about a local path, or its tokenizer's cut-off "Couldn't instantiate
    the backend tokenizer from one of:"."""
    if not model.path:
        return
    folder = Path(model.path).expanduser()
    if folder.suffix.lower() == ".gguf" and folder.is_file():
        raise ModelLoadError(f"model.path={model.path!r} is a GGUF file: pass its folder and its name, "
                             f"model.path={str(folder.parent)!r} model.gguf_file={folder.name!r}")
    if not folder.is_dir():
        raise ModelLoadError(f"model.path={model.path!r} is not a folder: pass the folder holding config.json and the "
                             "weights, or leave model.path unset to load model.name from the Hub")
    if model.gguf_file and not (folder / model.gguf_file).is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise ModelLoadError(f"model.gguf_file={model.gguf_file!r} is not in {folder}: its GGUF files are "
                             f"{present}{_subfolders_holding(folder, model.gguf_file)}")
    if not model.gguf_file and not (folder / "config.json").is_file():
        gguf = sorted(p.name for p in folder.glob("*.gguf"))
        if gguf:
            raise ModelLoadError(f"model.path={model.path!r} holds GGUF files and no config.json: name one as "
                                 f"model.gguf_file (e.g. model.gguf_file={gguf[0]!r}; the folder has {gguf})")
        raise ModelLoadError(f"model.path={model.path!r} holds no config.json: pass the folder holding config.json and "
                             f"the weights{_subfolders_holding(folder, 'config.json')}")


def _is_file(path: Path) -> bool:
    """Path.is_file, with a subfolder we may not read (a model.path of /tmp holds some) counted as holding nothing."""
    try:
        return path.is_file()
    except OSError:
        return False


def _subfolders_holding(folder: Path, name: str) -> str:
    """`, e.g. model.path=<subfolder>` for the subfolders of `folder` that hold `name` (the first three), else ""."""
    try:
        found = sorted(str(child) for child in folder.iterdir() if _is_file(child / name))
    except OSError:
        return ""
    return f", e.g. model.path={' or model.path='.join(found[:3])}" if found else ""


def _from_pretrained(factory, model: ModelConfig, **kwargs):
    check_model_folder(model)
    source = model_source(model)
    try:
        return factory.from_pretrained(source, **kwargs, **hub_options(model))
    except OSError as err:
        if model.path:
            raise ModelLoadError(
                f"cannot load the model from model.path={model.path!r} ({str(err).splitlines()[0]}): "
                "pass a folder with config.json and the weights"
            ) from err
        raise ModelLoadError(
            f"cannot load {source!r} from the Hugging Face Hub ({str(err).splitlines()[0]}): without network, "
            "download it elsewhere and pass model.path=<local folder>"
        ) from err
