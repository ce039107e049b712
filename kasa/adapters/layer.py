"""The wrapper every adapter method shares: a frozen nn.Linear or GPT-2 Conv1D plus one adapter block per adapted
output range (the whole output, or parts of a fused projection such as GPT-2's q, k, v in `c_attn`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kasa.adapters.truncation import Components

Decompose = Callable[[torch.Tensor, int, str], Components]
SUPPORTED_LAYERS = (nn.Linear, Conv1D)


class RemovedComponents(nn.Module):
    """Base of the adapter blocks: the frozen singular triplets a method took out of W0 (n x m), so that
    W_base = W0 - u diag(s) v^T can be rebuilt from the original weights without another decomposition."""

    def __init__(self, n: int, m: int, rank: int) -> None:
        super().__init__()
        self.register_buffer("removed_u", torch.zeros(n, rank))
        self.register_buffer("removed_s", torch.zeros(rank))
        self.register_buffer("removed_v", torch.zeros(m, rank))

    def set_removed(self, *parts: Components) -> None:
        self.removed_u = torch.cat([p.u for p in parts], dim=1)
        self.removed_s = torch.cat([p.s for p in parts])
        self.removed_v = torch.cat([p.v for p in parts], dim=1)

    def removed_matrix(self) -> torch.Tensor:
        return Components(self.removed_u, self.removed_s, self.removed_v).matrix()


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as W (out x in), a view: Conv1D stores W^T."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, blocks: dict[str, tuple[int, int, RemovedComponents]], dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict({name: block for name, (_, _, block) in blocks.items()})
        self.slices = {name: (start, stop) for name, (start, stop, _) in blocks.items()}
        self.out_features = weight_matrix(base_layer).shape[0]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.truncated = False  # the base weight is W0 minus the removed part
        # each block's (left, right) factors as merged: unmerge subtracts these, not the adapters' values now, which
        # the auxiliary loss's gradients may have moved since (a model trained while merged)
        self.merged_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.adapters_enabled = True  # False: the layer computes with its base weight alone (kasa-inspect)

    def _update_weight(self, sign: int, part: Callable[[str, RemovedComponents], torch.Tensor]) -> None:
        # In float32 for the half-precision dtypes (float64 stays float64), written back in the model dtype.
        w = weight_matrix(self.base_layer)
        if not torch.is_floating_point(w):  # a bitsandbytes 4/8-bit base: an update would be a second quantization
            raise ValueError(
                "cannot merge into (or change) a quantized base weight: dequantize it first (kasa.dequantize_base), "
                "or export with kasa-export format=merged, which writes the merged model in the compute dtype"
            )
        with torch.no_grad():
            for name, block in self.adapters.items():
                start, stop = self.slices[name]
                rows = w[start:stop]
                dtype = torch.promote_types(rows.dtype, torch.float32)
                update = part(name, block).to(device=rows.device, dtype=dtype)
                rows.copy_((rows.to(dtype) + sign * update).to(rows.dtype))

    def removed_weight(self) -> torch.Tensor:
        """The whole removed part (out x in, float32): each block's removed matrix in its rows."""
        w = weight_matrix(self.base_layer)
        removed = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for name, block in self.adapters.items():
            start, stop = self.slices[name]
            removed[start:stop] = block.removed_matrix().to(w.device)
        return removed

    def truncate_base(self) -> None:
        """W_base = W0 - removed part, once, after the blocks hold their removed triplets."""
        self.truncated = True  # first: a failure part way has changed the weight already
        self._update_weight(-1, lambda name, block: block.removed_matrix())

    def restore_base(self) -> None:
        self._update_weight(+1, lambda name, block: block.removed_matrix())
        self.truncated = False

    def _merged_delta(self, name: str, block: RemovedComponents) -> torch.Tensor:
        left, right = self.merged_factors[name]
        return left @ right

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.merged_factors = {name: tuple(t.detach().clone() for t in block.delta_factors())
                                       for name, block in self.adapters.items()}
            self._update_weight(+1, self._merged_delta)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._update_weight(-1, self._merged_delta)
            self.merged, self.merged_factors = False, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or not self.adapters_enabled:
            return result
        h = self.dropout(x)
        for name, block in self.adapters.items():
            start, stop = self.slices[name]
            delta = block(h.to(block.removed_s.dtype)).to(result.dtype)
            if stop - start == self.out_features:
                result = result + delta
            else:
                result[..., start:stop] += delta
        return result
