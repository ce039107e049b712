"""The bytes a step's tensors hold at their peak, followed op by op: the CPU's counterpart of
torch.cuda.max_memory_allocated, shared by scripts/bench_llm.py and scripts/estimate_check.py. Resident memory also
holds what no tensor owns (library code paged in at the first step, freed heap memory glibc keeps), as a GPU holds
its CUDA context and its allocator's reserve, which max_memory_allocated leaves out too."""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """The bytes held by the tensors that the ops run inside it create (views and the `existing` storages not
    counted again), at their peak: a CPU step's counterpart of torch.cuda.max_memory_allocated's growth."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.live, self.bytes, self.peak = existing, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in self.existing or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self.freed, key)  # the storage's Python object lives as long as its memory
        return out

    def freed(self, key: int) -> None:
        self.bytes -= self.live.pop(key, 0)


def storage_bytes(tensors: list[torch.Tensor]) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # shared storage once


def _attached_tensors(holder: object) -> list[torch.Tensor]:
    """Tensors that bitsandbytes hangs on a parameter rather than registering: a 4-bit weight's QuantState (absmax,
    code, and the nested state of double quantization) and an 8-bit weight's row scales (SCB)."""
    found = []
    for value in vars(holder).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif type(value).__name__ == "QuantState":
            found += _attached_tensors(value)
    return found


def model_storages(model: torch.nn.Module) -> dict[int, int]:
    """The bytes of each storage the model holds: parameters, buffers and quantization state, tied weights once."""
    params = list(model.parameters())
    return storage_bytes([*params, *model.buffers(), *(t for p in params for t in _attached_tensors(p))])


def tensor_peak_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], object]) -> int:
    """The model's tensors and the optimizer's states plus the most that `step()`'s own tensors hold at once."""
    existing = model_storages(model) | storage_bytes([t for state in optimizer.state.values() for t in state.values()
                                                      if isinstance(t, torch.Tensor)])
    with LiveTensorBytes(set(existing)) as tensors:
        step()
    return sum(existing.values()) + tensors.peak
