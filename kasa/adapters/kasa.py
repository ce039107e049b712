"""The KaSA adapter block (Wang et al., ICLR 2025), for one weight W0 (n x m) or one slice of a fused projection.

    W_world = W0 - U_r diag(S_r) V_r^T                   r smallest singular triplets removed (frozen base)
    h(x)    = W_world x + eta * dU diag(dSigma) dV^T x   eta = alpha / r, trainable dU (n x r), dSigma (r), dV (m x r)
    L2      = sum_j dSigma_j^2                                              (paper eq. 10)
    L3      = ||dU^T dU - I_r||_F + ||dV^T dV - I_r||_F                     (paper eq. 11)

dV is stored transposed (`delta_v`, r x m) like an nn.Linear weight, so the update runs as two thin matmuls and the
n x m product is never built while training. The removed triplets stay in the block (`removed_*`), so an adapter
reloads onto the original base model without repeating the SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kasa.adapters.config import AdapterConfig
from kasa.adapters.layer import Decompose, RemovedComponents


@dataclass
class Regularization:
    """One module's KaSA terms: l2 = sum(dSigma^2), l3_u / l3_v the two orthogonality norms."""

    l2: torch.Tensor
    l3_u: torch.Tensor
    l3_v: torch.Tensor


@dataclass
class AuxLoss:
    """(beta * L2 + gamma * L3) averaged over the adapted modules, the mean raw terms for logging, and each module's
    own terms (paper figure 11 plots them per layer)."""

    total: torch.Tensor
    l2: torch.Tensor
    l3: torch.Tensor
    modules: dict[str, Regularization]

    def module_values(self) -> dict[str, list[float]]:
        """{module: [l2, l3_u, l3_v]} as floats (a device sync: call at logging steps only)."""
        return {name: [t.l2.item(), t.l3_u.item(), t.l3_v.item()] for name, t in self.modules.items()}


class KasaBlock(RemovedComponents):
    def __init__(self, n: int, m: int, config: AdapterConfig) -> None:
        r, k = config.rank, config.removed_rank
        super().__init__(n, m, k + r if config.init == "principal" else k)
        self.n, self.m, self.r, self.k = n, m, r, k
        self.scaling = config.scaling
        self.beta = config.effective_beta
        self.gamma = config.effective_gamma
        self.init = config.init
        self.authors_orth_form = config.orth_form == "authors"
        self.delta_u = nn.Parameter(torch.zeros(n, r))
        self.delta_sigma = nn.Parameter(torch.zeros(r))
        self.delta_v = nn.Parameter(torch.zeros(r, m))
        self.last_regularization: Regularization | None = None

    @torch.no_grad()
    def initialise(self, weight: torch.Tensor, decompose: Decompose) -> None:
        """Knowledge-based SVD truncation of `weight` (n x m) and the adapter's initialisation (paper F.6)."""
        minor = decompose(weight, self.k, "smallest")
        removed = [minor]
        if self.init == "normal":  # the paper's default: dU = 0, dV and dSigma normal, so dW = 0 at step 0
            self.delta_v.normal_(0.0, 1.0 / math.sqrt(self.m))  # rows of unit norm on average: near-orthonormal
            self.delta_sigma.normal_(0.0, 1.0)
        elif self.init == "u_normal":
            self.delta_u.normal_(0.0, 1.0 / math.sqrt(self.n))
            self.delta_sigma.normal_(0.0, 1.0)
        else:  # start from the r minor (with k = r the removed noise: the model starts at W0) or principal components
            which = "smallest" if self.init == "minor" else "largest"
            start = minor if which == "smallest" and self.k == self.r else decompose(weight, self.r, which)
            if self.init == "principal":
                removed.append(start)  # the principal part moves into the adapter, as in PiSSA
            self.delta_u.copy_(start.u)
            self.delta_sigma.copy_(start.s / self.scaling)
            self.delta_v.copy_(start.v.T)
        self.set_removed(*removed)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and (self.beta or self.gamma):
            # Computed here, inside forward, because that is when FSDP / ZeRO-3 hold the full parameters.
            self.last_regularization = self.regularization()
        return F.linear(F.linear(h, self.delta_v) * (self.delta_sigma * self.scaling), self.delta_u)

    def delta_weight(self) -> torch.Tensor:
        return (self.delta_u * (self.delta_sigma * self.scaling)) @ self.delta_v

    def regularization(self) -> Regularization:
        eye = torch.eye(self.r, device=self.delta_u.device, dtype=self.delta_u.dtype)
        gram_u = self.delta_u.T @ self.delta_u  # dU^T dU
        gram_v = self.delta_v @ self.delta_v.T  # dV^T dV (delta_v holds dV^T)
        if self.authors_orth_form:
            # ||B B^T - I_n||_F and ||A^T A - I_m||_F of the released code, exactly, from the r x r Grams:
            # ||A^T A - I_m||_F^2 = ||A A^T - I_r||_F^2 + (m - r) for any r x m matrix A.
            l3_u = ((gram_u - eye).square().sum() + (self.n - self.r)).sqrt()
            l3_v = ((gram_v - eye).square().sum() + (self.m - self.r)).sqrt()
        else:
            l3_u = torch.linalg.matrix_norm(gram_u - eye)
            l3_v = torch.linalg.matrix_norm(gram_v - eye)
        return Regularization(self.delta_sigma.square().sum(), l3_u, l3_v)

    def weighted_regularization(self, terms: Regularization) -> torch.Tensor:
        return self.beta * terms.l2 + self.gamma * (terms.l3_u + terms.l3_v)
