"""The LoRA adapter block and its SVD-initialised relatives, for one weight W0 (n x m) or one fused slice.

    h(x) = W_base x + (alpha / r) B A x,    A (r x m), B (n x r) trainable

    lora      A Kaiming-uniform, B = 0, W_base = W0
    svd_lora  as lora, but W_base = W0 minus its r smallest singular triplets (KaSA's truncation; ablation step 2)
    pissa     A = sqrt(S_p / eta) V_p^T, B = U_p sqrt(S_p / eta) from the r largest triplets, W_base = W0 - U_p S_p V_p^T
    milora    the same with the r smallest triplets

PiSSA and MiLoRA split sqrt(S / eta) between A and B so that eta B A equals the removed part for any alpha: the
model is W0 at step 0 and the frozen base is exactly the residual of the paper's definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kasa.adapters.config import AdapterConfig
from kasa.adapters.layer import Decompose, RemovedComponents


class LoraBlock(RemovedComponents):
    def __init__(self, n: int, m: int, config: AdapterConfig) -> None:
        r = config.rank
        removed = {"lora": 0, "svd_lora": config.removed_rank}.get(config.method, r)
        super().__init__(n, m, removed)
        self.n, self.m, self.r, self.k = n, m, r, removed
        self.method = config.method
        self.scaling = config.scaling
        self.lora_a = nn.Parameter(torch.zeros(r, m))
        self.lora_b = nn.Parameter(torch.zeros(n, r))

    @torch.no_grad()
    def initialise(self, weight: torch.Tensor, decompose: Decompose) -> None:
        if self.method in ("lora", "svd_lora"):
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # the LoRA reference initialisation
            if self.method == "svd_lora":
                self.set_removed(decompose(weight, self.k, "smallest"))
            return
        part = decompose(weight, self.r, "largest" if self.method == "pissa" else "smallest")
        root = (part.s / self.scaling).sqrt()
        self.lora_a.copy_(root[:, None] * part.v.T)
        self.lora_b.copy_(part.u * root)
        self.set_removed(part)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(h, self.lora_a) * self.scaling, self.lora_b)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right), left @ right = dW: n x r and r x m."""
        return self.lora_b * self.scaling, self.lora_a

    def delta_weight(self) -> torch.Tensor:
        left, right = self.delta_factors()
        return left @ right
