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

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kasa.adapters.config import AdapterConfig
from kasa.adapters.layer import Decompose, RemovedComponents


class Regularization(NamedTuple):
    """KaSA's terms: l2 = sum(dSigma^2), l3_u / l3_v the two orthogonality norms; scalars for one module, or vectors
    with one entry per module."""

    l2: torch.Tensor
    l3_u: torch.Tensor
    l3_v: torch.Tensor


@dataclass
class AuxLoss:
    """(beta * L2 + gamma * L3) averaged over the adapted modules, the mean raw terms for logging, and each module's
    own terms (paper figure 11 plots them per layer): `terms` holds them as vectors, row `rows[i]` for `names[i]`
    (the modules in the model's order; the rows in the order they were computed in)."""

    total: torch.Tensor
    l2: torch.Tensor
    l3: torch.Tensor
    names: list[str]
    rows: list[int]
    terms: Regularization

    @property
    def modules(self) -> dict[str, Regularization]:
        return {name: Regularization(*(t[row] for t in self.terms)) for name, row in zip(self.names, self.rows)}

    def module_values(self) -> dict[str, list[float]]:
        """{module: [l2, l3_u, l3_v]} as floats (one device sync: call at logging steps only)."""
        values = torch.stack(tuple(self.terms), 1).tolist()
        return {name: values[row] for name, row in zip(self.names, self.rows)}


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
        self.recorded_versions: tuple[tuple[int, int], ...] = ()  # the parameters' (id, version) at that record

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
        if self.training and torch.is_grad_enabled() and (self.beta or self.gamma) and aux_loss_needs_forward():
            # Computed here, inside forward, because that is when FSDP / ZeRO-3 hold the full parameters. A single
            # process computes every block's terms at once, before forward, instead (batched_regularization): the
            # dozen small ops per block and step would cost ~5% of a step with hundreds of blocks.
            self.last_regularization, self.recorded_versions = self.regularization(), self.parameter_versions()
        return F.linear(F.linear(h, self.delta_v) * (self.delta_sigma * self.scaling), self.delta_u)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right), left @ right = dW: n x r and r x m."""
        return self.delta_u * (self.delta_sigma * self.scaling), self.delta_v

    def parameter_versions(self) -> tuple[tuple[int, int], ...]:
        """dU's, dSigma's and dV's identity and autograd's counter of in-place changes (an optimizer step moves it)."""
        return tuple((id(p), p._version) for p in (self.delta_u, self.delta_sigma, self.delta_v))

    def current_record(self) -> Regularization | None:
        """The terms this block's forward pass recorded, taken (cleared), unless the same parameters changed since: a
        record left from an earlier step (aux_loss called before the forward pass, or a reentrant checkpoint's
        recomputation in backward) holds old values whose graph the optimizer step has invalidated. Under FSDP the
        forward pass sees other parameter objects (the gathered ones) than the module holds after it: trusted."""
        record, self.last_regularization = self.last_regularization, None
        if record is None:  # a single process records nothing: no versions to read for each block at each step
            return None
        now = self.parameter_versions()
        stale = any(rid == nid and rv != nv for (rid, rv), (nid, nv) in zip(self.recorded_versions, now))
        return None if stale else record

    def delta_weight(self) -> torch.Tensor:
        left, right = self.delta_factors()
        return left @ right

    def regularization(self) -> Regularization:
        terms = _GroupRegularization.apply(self.n, self.m, self.authors_orth_form, self.delta_u, self.delta_sigma,
                                           self.delta_v)
        return Regularization(*(t[0] for t in terms))


def aux_loss_needs_forward() -> bool:
    """Whether `aux_loss` must be called after the forward pass, not before it: when this process is one of several
    (DDP, FSDP, ZeRO-3), where sharding may hide parameters outside forward, so that each block records its terms
    in its forward pass. Otherwise call it before: autograd runs a graph's newest nodes first, so the auxiliary
    loss's backward then runs after the model's and the adapters' gradients appear layer by layer, instead of all
    of them being held from the start of the backward pass, where a step's memory peaks."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def batched_regularization(blocks: list[KasaBlock]) -> tuple[list[int], Regularization]:
    """Every block's terms as vectors whose entry j belongs to blocks[order[j]], and `order`: a block's record from
    this step's forward pass (read and cleared; `KasaBlock.current_record`), or else computed as
    `KasaBlock.regularization` does, from a few batched ops per group of blocks of one shape instead of a dozen ops
    per block. In a single process those blocks' parameters are first packed (`pack_parameters`), so that the batched
    ops read them in place."""
    records = [block.current_record() for block in blocks]
    recorded = [i for i, record in enumerate(records) if record is not None]
    groups: dict[tuple, list[int]] = {}
    for i, block in enumerate(blocks):
        if records[i] is None:
            key = (block.n, block.m, block.r, block.authors_orth_form, block.delta_u.device, block.delta_u.dtype)
            groups.setdefault(key, []).append(i)
    parts = []
    if recorded:
        parts.append(Regularization(*map(torch.stack, zip(*(records[i] for i in recorded)))))
    # Not under torch.distributed (its wrappers own the parameters' memory), inference mode (the parameters would
    # become inference tensors) or torch.compile's tracing (which guards on where each parameter lies).
    pack = not (aux_loss_needs_forward() or torch.is_inference_mode_enabled() or torch.compiler.is_compiling())
    for (n, m, _, authors, device, _), members in groups.items():
        kinds = [[blocks[i].delta_u for i in members], [blocks[i].delta_sigma for i in members],
                 [blocks[i].delta_v for i in members]]
        if pack and device.type != "meta":
            for params in kinds:
                if stacked_view(params) is None:
                    pack_parameters(params)
        params = [p for block in zip(*kinds) for p in block]
        parts.append(_GroupRegularization.apply(n, m, authors, *params))
    order = recorded + [i for members in groups.values() for i in members]
    return order, Regularization(*map(torch.cat, zip(*parts)))


def pack_parameters(params: list[nn.Parameter]) -> None:
    """Make `params` (one shape, dtype and device) views of one new tensor, one after another, so that
    `stacked_view` finds them stacked in place: the batched terms then read every block's factors where they are,
    instead of stacking copies of them in forward and again in backward. Done again whenever
    something gave them memory of their own (`.to()`, a deepcopy); the parameters keep their identity, so the
    optimizer and its state follow."""
    with torch.no_grad():
        stacked = torch.stack([p.detach() for p in params])
        for param, row in zip(params, stacked):
            param.data = row


def stacked_view(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """`params` (one shape and dtype) as one G x shape tensor over their own memory, when they lie one after another
    in one storage (as `pack_parameters` leaves them), else None."""
    if torch.compiler.is_compiling():
        return None
    first = params[0]
    nbytes, start = first.numel() * first.element_size(), first.data_ptr()
    storage = first.untyped_storage()
    fits = storage.nbytes() - first.storage_offset() * first.element_size() >= len(params) * nbytes
    if not fits or not all(p.is_contiguous() and p.data_ptr() == start + i * nbytes for i, p in enumerate(params)):
        return None
    return first.new_empty(0).set_(storage, first.storage_offset(), (len(params), *first.shape))


def _stacked(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The G x shape stack of `params`: in place where `pack_parameters` left them, else a copy."""
    stacked = stacked_view(params)
    return torch.stack(params) if stacked is None else stacked


def weighted_total(blocks: list[KasaBlock], terms: Regularization) -> torch.Tensor:
    """sum_i beta_i L2_i + gamma_i L3_i of the blocks whose terms are the vectors' entries, in that order: one slice
    per run of blocks with the same beta and gamma (all of them, in kasa's runs), so no per-block op and no
    host-to-device copy of the weights."""
    total, start = terms.l2.new_zeros(()), 0
    for (beta, gamma), run in itertools.groupby(blocks, key=lambda block: (block.beta, block.gamma)):
        stop = start + len(list(run))
        total = total + beta * terms.l2[start:stop].sum() + gamma * (terms.l3_u[start:stop] +
                                                                     terms.l3_v[start:stop]).sum()
        start = stop
    return total


class _GroupRegularization(torch.autograd.Function):
    """(L2, L3 of dU, L3 of dV) of G blocks of one shape, each a vector of G, from the blocks' parameters given as
    (delta_u, delta_sigma, delta_v) per block (delta_v holds dV^T), with the gradient written out: d sum(s^2) / ds =
    2 s, and with A = X^T X - I (symmetric) d ||A||_F / dX = 2 X A / ||A||_F; the authors' form,
    sqrt(||A||_F^2 + c), has the same gradient over its own value. One batched product per side where autograd
    would run four, and no graph of small ops. Computed in the parameters' dtype, outside autocast."""

    @staticmethod
    def forward(ctx, n: int, m: int, authors: bool, *params: torch.Tensor):
        delta_u, delta_sigma, delta_v = (_stacked(params[i::3]) for i in range(3))  # G x n x r, G x r, G x r x m
        device = delta_u.device.type  # autocast off where it exists (not on the meta device of kasa-estimate's tracing)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            r = delta_sigma.shape[1]
            eye = torch.eye(r, device=delta_u.device, dtype=delta_u.dtype)
            off_u = delta_u.transpose(1, 2) @ delta_u - eye  # dU^T dU - I
            off_v = delta_v @ delta_v.transpose(1, 2) - eye  # dV^T dV - I
            squares_u, squares_v = off_u.square().sum((1, 2)), off_v.square().sum((1, 2))
            if authors:
                # ||B B^T - I_n||_F and ||A^T A - I_m||_F of the released code, exactly, from the r x r Grams:
                # ||A^T A - I_m||_F^2 = ||A A^T - I_r||_F^2 + (m - r) for any r x m matrix A.
                squares_u, squares_v = squares_u + (n - r), squares_v + (m - r)
            l3_u, l3_v = squares_u.sqrt(), squares_v.sqrt()
        # The parameters themselves, not stacked copies or views: the loop computes this before the model's forward
        # pass, so that its backward runs last, and copies of every adapter's dU and dV would be held all through the
        # step; and autograd checks a saved parameter for changes in place before backward, a view over it not.
        ctx.save_for_backward(off_u, off_v, l3_u, l3_v, *params[0::3], *params[1::3], *params[2::3])
        return delta_sigma.square().sum(1), l3_u, l3_v

    @staticmethod
    def backward(ctx, grad_l2: torch.Tensor, grad_l3_u: torch.Tensor, grad_l3_v: torch.Tensor):
        off_u, off_v, l3_u, l3_v, *params = ctx.saved_tensors
        blocks = len(l3_u)
        delta_u, delta_sigma, delta_v = (_stacked(params[i * blocks:(i + 1) * blocks]) for i in range(3))
        tiny = torch.finfo(l3_u.dtype).tiny  # a zero norm has a zero matrix under it: gradient 0, not 0/0
        grad_sigma = 2 * delta_sigma * grad_l2[:, None]
        # the factor scales the r x r matrices, not the n x r products: one pass less over the gradients' memory
        grad_u = delta_u @ (off_u * (2 * grad_l3_u / l3_u.clamp_min(tiny))[:, None, None])
        grad_v = (off_v * (2 * grad_l3_v / l3_v.clamp_min(tiny))[:, None, None]) @ delta_v
        grads = [g for block in zip(grad_u.unbind(), grad_sigma.unbind(), grad_v.unbind()) for g in block]
        return None, None, None, *grads
