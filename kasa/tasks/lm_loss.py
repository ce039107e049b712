"""The causal-LM training loss: mean token cross-entropy of the labelled tokens, without the vocabulary-sized logits.

The plain way runs the language-model head over every kept position and hands the logits to cross-entropy, which
keeps float32 log-probabilities of N x vocabulary for backward, next to the logits and, in backward, their gradient:
for LLaMA-3's 128K words and 4K labelled tokens that is 2 GiB each, more than a 24 GB card can spare. For the
models whose logits are exactly `lm_head(hidden)` (no soft-capping or scaling after the head, no bias, a frozen
head), kasa instead computes the loss a chunk of tokens at a time and, in the same pass, the gradient with respect
to the hidden states, d loss / d hidden = (softmax - target distribution) W / N; backward only scales it. Peak
extra memory is one chunk of logits instead of three full copies, and the arithmetic is the same as the plain
way's (the head's matmul forward, its input-gradient matmul backward). Any other model, a trainable or adapted
head, and torch.compile'd models take the plain way.

The head is applied inside a forward pre-hook on the model's output embedding, where sharded (FSDP, ZeRO-3)
weights are gathered, so the model is still called through its wrappers (DDP's gradient synchronisation) and the
head itself then runs on zero columns. Tested against the plain loss for each listed model type, under FSDP2 and
under DeepSpeed ZeRO-3 (tests/test_lm_loss.py, tests/test_distributed.py).
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from kasa.data.prompts import IGNORE_INDEX

# Model types whose causal-LM forward computes `logits = lm_head(hidden_states[:, logits_to_keep])` and nothing
# after it (Gemma-2's soft-capping, Cohere's logit_scale or Granite's logits_scaling would be skipped by the chunked
# loss). Each is checked against the plain loss in tests/test_lm_loss.py.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "phi3"})
MIN_CHUNK_ROWS = 256  # fewer rows per matmul would re-read the head's weight too often


LOSS_POSITION_KEYS = ("loss_columns", "loss_tokens", "loss_targets")  # what loss_positions adds to a batch


def loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where a batch's loss lies, found from its labels while they are still on the host (the collators call it):
    the training step then picks those positions with index tensors whose sizes it knows, and never waits for the
    device to tell it how many there are (a `nonzero` or a boolean mask on the device is a host-device sync).
    `loss_columns`: the sequence positions that predict a labelled token in some row (column c predicts token
    c + 1), where the head runs (prompts carry no loss); `loss_tokens`: the labelled tokens among batch x those
    columns, as flat indices; `loss_targets`: their token ids."""
    columns = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    targets = labels[:, columns + 1].reshape(-1)
    tokens = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return dict(zip(LOSS_POSITION_KEYS, (columns, tokens, targets[tokens])))


def chunk_rows(tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: a chunk's logits about the size of all the tokens' hidden states, at least MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, -(-tokens * hidden_size // vocab_size))


def chunk_workspace_bytes(tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype) -> int:
    """The chunked loss's temporaries at their largest: a chunk's logits in the compute dtype and, unless that is
    float32 already, their float32 copy (the softmax then runs in place)."""
    rows = min(tokens, chunk_rows(tokens, hidden_size, vocab_size))
    size = torch.empty(0, dtype=dtype).element_size()
    return rows * vocab_size * (size + (4 if size != 4 else 0))


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i W^T, target_i) with label smoothing, chunk by chunk; forward also computes the gradient
    with respect to `hidden` (the head's weight is frozen), which backward scales by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                label_smoothing: float) -> torch.Tensor:
        tokens, vocab = hidden.shape[0], weight.shape[0]
        rows = chunk_rows(tokens, hidden.shape[1], vocab)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows, None]
            logits = (h @ weight.T).float()
            target_logit = logits.gather(1, t)
            mean_logit = logits.mean(dim=1, keepdim=True) if label_smoothing else None
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one chunk of float32 values at a time, never two
            partition = probs.sum(dim=1, keepdim=True)
            lse = top + partition.log()
            nll = lse - target_logit
            if label_smoothing:  # F.cross_entropy's: (1 - e) nll + e * mean over the words of -log p
                nll = (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
            total += nll.sum()
            if grad_hidden is not None:
                probs.div_(partition)
                probs.scatter_add_(1, t, torch.full_like(t, -(1 - label_smoothing), dtype=probs.dtype))
                if label_smoothing:
                    probs.sub_(label_smoothing / vocab)
                grad_hidden[start:start + rows] = probs.to(weight.dtype) @ weight
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden.div_(tokens))
        return total / tokens

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP, torch.compile and PEFT wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod") or hasattr(model, "get_base_model"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model.get_base_model()
    return model


def chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output embedding when the chunked loss computes exactly its logits (module docstring)."""
    inner = unwrapped(model)
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not _is_plain_linear(head):
        return None
    return head if head.bias is None and not head.weight.requires_grad else None


def _is_plain_linear(module: nn.Module | None) -> bool:
    """An nn.Linear itself (not bitsandbytes' or kasa's layers, which compute something else), also when FSDP2 made
    it a unit of its own (its class then becomes FSDPLinear(FSDPModule, nn.Linear))."""
    cls = type(module)
    # Only a process that imported FSDP can hold an FSDP unit: the others skip that import (~0.5 s at the first step).
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        cls = next(base for base in cls.__bases__ if base is not fsdp_module)
    return cls is nn.Linear


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (PEFT's wrappers pass it on through **kwargs)."""
    try:
        return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters
    except (TypeError, ValueError):
        return False


def labelled_token_loss(model: nn.Module, inputs: dict[str, torch.Tensor], positions: dict[str, torch.Tensor],
                        label_smoothing: float = 0.0, chunked: bool = True) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens that `positions` (loss_positions; a batch holds them) locates; the
    head runs at their columns only, chunked where `chunkable_head` allows."""
    columns, tokens, targets = (positions[key] for key in LOSS_POSITION_KEYS)
    slice_inside = _accepts_logits_to_keep(model)
    extra = {"logits_to_keep": columns} if slice_inside else {}
    head = chunkable_head(model) if chunked else None
    if head is None:
        logits = model(**inputs, **extra).logits
        logits = logits if slice_inside else logits[:, columns]
        labelled = logits.flatten(0, 1).index_select(0, tokens)
        return F.cross_entropy(labelled.float(), targets, label_smoothing=label_smoothing)

    hidden: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []

    def capture(module: nn.Linear, args: tuple) -> None:
        hidden.append(args[0] if slice_inside else args[0][:, columns])

    def chunked_loss(module: nn.Linear, args: tuple) -> tuple:
        labelled = hidden[0].flatten(0, 1).index_select(0, tokens)
        losses.append(ChunkedHeadCrossEntropy.apply(labelled, module.weight, targets, label_smoothing))
        return (args[0][:, :0],)  # the head itself runs on no column

    # The hidden states are taken before any wrapper's hooks (ZeRO-3 and FSDP wrap a module's input in functions
    # whose backward expects the module's own backward to have run, which the unused logits never do); the loss is
    # computed after them, where the head's weight is gathered.
    handles = [head.register_forward_pre_hook(capture, prepend=True), head.register_forward_pre_hook(chunked_loss)]
    try:
        model(**inputs, **extra)
    finally:
        for handle in handles:
            handle.remove()
    return losses[0]
