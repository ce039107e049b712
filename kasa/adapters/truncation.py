"""Singular components of a weight matrix: the r smallest (KaSA, MiLoRA) or largest (PiSSA), fast and cached.

KaSA only needs the r smallest singular triplets of W (n x m), never the full SVD. With k = min(n, m) and G the
k x k Gram matrix of the smaller side (W W^T if n <= m, else W^T W), the eigenpairs of G are the squared singular
values and the singular vectors of that side; the other side follows from one thin product, W^T u / sigma or
W v / sigma. G is formed in float64, which keeps sigma_min^2 accurate to ~1e-16 * sigma_max^2, far tighter than a
float32 SVD. On the CPU only the wanted eigenpairs are computed (shift-invert Lanczos around 0 for the smallest,
plain Lanczos for the largest), so the cost is the Gram product plus one Cholesky factorisation; on a GPU a dense
eigh is already fast. `method="svd"` keeps torch.linalg.svd as the reference.

Activation basis (`moments=`): with the second moment of the layer's inputs C = E[x x^T] = L L^T, the same
decomposition runs on W L instead of W, and the triplets map back as (U_r, S_r, L^{-T} V_r). Their matrix
U_r S_r V_r^T L^{-1} is the rank-r part of W whose removal changes the outputs least on those inputs:
E||W_noise x||^2 = ||W_noise L||_F^2 = sum of the removed S_r^2 (Eckart-Young in the norm that C defines), never
more than removing W's own r smallest triplets does. C = I gives the weight basis.

Results are cached on disk, keyed by a hash of the weight's bytes, the rank, the side, the method and, in the
activation basis, the hash of C and the damping, so that the runs of a sweep pay the decomposition once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kasa.adapters.calibration import InputMoments
from kasa.adapters.config import SVD_METHODS
from kasa.run_dir import write_atomically

log = logging.getLogger(__name__)
_cache_write_failed = False  # said once per process, not once per weight

Which = Literal["smallest", "largest"]
# Below this size a dense eigensolver is as fast as Lanczos and has no restrictions on r.
_DENSE_EIGH_MAX_K = 256


@dataclass
class Components:
    """r singular triplets of a weight W (n x m): W ~= u @ diag(s) @ v.T on the span they cover (float32)."""

    u: torch.Tensor  # (n, r)
    s: torch.Tensor  # (r,)
    v: torch.Tensor  # (m, r)

    def matrix(self) -> torch.Tensor:
        """The rank-r matrix u diag(s) v^T, always computed the same way so that reloads reproduce it bit for bit."""
        return (self.u * self.s) @ self.v.T


def singular_components(
    weight: torch.Tensor,
    rank: int,
    which: Which = "smallest",
    method: str = "gram",
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    moments: InputMoments | None = None,
    damping: float = 1e-6,
) -> Components:
    """The `rank` smallest or largest singular triplets of a 2-D `weight` (any float dtype), as float32 tensors
    on `weight`'s device. `device` is where the decomposition runs: by default a GPU whenever one is available, even
    if the weight sits on the CPU. With `cache_dir`, results are read from and written to that folder.

    With `moments` (the inputs' second moment, see kasa.adapters.calibration), the triplets are those of the
    activation basis: of W L with C = L L^T, mapped back so that u diag(s) v^T = U_r S_r V_r^T L^{-1} (v is then
    not orthonormal). `damping` regularises C (InputMoments.factor)."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, m = weight.shape
    k = min(n, m)
    if not 0 < rank < k:
        raise ValueError(
            f"rank r={rank} must satisfy 0 < r < min(n, m) = {k} for a {n} x {m} weight: lower the rank"
        )
    if method not in SVD_METHODS:
        raise ValueError(f"unknown truncation method {method!r}; choose one of {', '.join(SVD_METHODS)}")
    if which not in ("smallest", "largest"):
        raise ValueError(f"which must be 'smallest' or 'largest', not {which!r}")

    if moments is not None and moments.dim != m:
        raise ValueError(f"input moments of size {moments.dim} do not fit a weight with {m} inputs")
    cache_file = None
    if cache_dir is not None:
        basis = "weight" if moments is None else f"activation|{moments.digest()}|{damping!r}"
        cache_file = Path(cache_dir) / f"{_cache_key(weight, rank, which, method, basis)}.safetensors"
        cached = _read_cache(cache_file, weight.device)
        if cached is not None:
            return cached

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    w = weight.detach().to(device=device)
    if moments is None:
        comps = _decompose(w, rank, which, method)
    else:
        # Everything in float64: the minor directions of W L are what this basis is about.
        factor = moments.factor(damping).to(device)
        u, s, v = _decompose(_float64(w) @ factor, rank, which, method)
        # L^{-T} V_r: a triangular solve, never an explicit inverse.
        v = torch.linalg.solve_triangular(factor.T, v.to(torch.float64), upper=True)
        comps = u, s, v
    out = Components(*(t.to(device=weight.device, dtype=torch.float32).contiguous() for t in comps))

    if cache_file is not None:
        _write_cache(cache_file, out)
    return out


def _read_cache(cache_file: Path, device: torch.device) -> Components | None:
    """A cached decomposition, or None: none cached, or a file that does not read back (it is then recomputed and
    written again; the cache only saves time, it never stops a run)."""
    if not cache_file.is_file():
        return None
    try:
        cached = load_file(str(cache_file), device=str(device))
        return Components(cached["u"], cached["s"], cached["v"])
    except Exception as err:  # safetensors' own error, a missing tensor, an unreadable file
        log.warning("ignoring the unreadable cached decomposition %s (%s): computing it again", cache_file, err)
        return None


def _write_cache(cache_file: Path, components: Components) -> None:
    """Write one decomposition into the cache, atomically (concurrent sweep jobs never read a half-written file). A
    cache that cannot be written (read-only, over quota, full) is said once, and the run goes on without it."""
    global _cache_write_failed
    tensors = {"u": components.u.cpu(), "s": components.s.cpu(), "v": components.v.cpu()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_file, lambda tmp: save_file(tensors, str(tmp)))
    except OSError as err:
        if not _cache_write_failed:
            log.warning("cannot write the decomposition cache in %s (%s): going on without it (method.svd_cache_dir="
                        "null switches it off)", cache_file.parent, err.strerror or err)
        _cache_write_failed = True


def _decompose(w: torch.Tensor, rank: int, which: Which, method: str) -> tuple[torch.Tensor, ...]:
    """(u, s, v) of the `rank` smallest or largest triplets of `w`, descending."""
    if method == "svd":
        k = min(w.shape)
        u, s, vh = torch.linalg.svd(w.float() if w.dtype != torch.float64 else w, full_matrices=False)
        keep = slice(k - rank, k) if which == "smallest" else slice(0, rank)
        return u[:, keep], s[keep], vh[keep, :].T
    return _gram_components(_float64(w), rank, which)


def _float64(w: torch.Tensor) -> torch.Tensor:
    """`w` in float64. On the CPU numpy casts it: after a torch cast, torch's OpenMP threads spin for a while and
    share the cores with the OpenBLAS calls that follow (the Gram product of a 768 x 768 weight ran ~40% slower)."""
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float16):
        return torch.from_numpy(w.numpy().astype(np.float64))
    return w.double()


def _gram_components(w: torch.Tensor, rank: int, which: Which) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, m = w.shape
    left_side = n <= m  # eigenvectors of the Gram are the left singular vectors when rows are fewer
    a = w if left_side else w.T  # (k, l) with k <= l: G = a a^T
    k = a.shape[0]
    if a.is_cuda or k <= _DENSE_EIGH_MAX_K:
        evals, evecs = torch.linalg.eigh(a @ a.T)  # ascending
        sel = slice(0, rank) if which == "smallest" else slice(k - rank, k)
        evals, evecs = evals[sel].flip(0), evecs[:, sel].flip(1)  # descending, as torch.linalg.svd orders them
        other = (evecs.T @ a).T  # (l, r) = other-side vectors times s (a's rows read in order: no transposed copy)
    else:
        evals, evecs, other = _lanczos_eigenpairs(a, rank, which)
    s = evals.clamp_min(0).sqrt()
    # Columns whose singular value is numerically zero carry no weight (u s v^T ignores them): leave them at zero
    # instead of dividing noise by ~0.
    tiny = s <= s.max().clamp_min(1.0) * torch.finfo(torch.float64).eps * max(n, m)
    other = torch.where(tiny, torch.zeros_like(other), other / torch.where(tiny, torch.ones_like(s), s))
    return (evecs, s, other) if left_side else (other, s, evecs)


def _lanczos_eigenpairs(a: torch.Tensor, rank: int, which: Which) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rank` extreme eigenpairs of G = a a^T (float64, CPU) without a full eigendecomposition, eigenvalues
    descending, and a^T times the eigenvectors. The products and the reordering stay in scipy and numpy: torch's
    products and index kernels leave its OpenMP threads spinning on the cores that the next Gram product needs."""
    from scipy.linalg import blas, lapack
    from scipy.sparse.linalg import LinearOperator, eigsh

    a_np = np.asfortranarray(a.numpy().T)  # (l, k) column-major: syrk with trans=1 forms a a^T, half a GEMM
    gram = blas.dsyrk(1.0, a_np, trans=1, lower=0)  # upper triangle only: all that eigsh and potrf below read
    k = gram.shape[0]
    v0 = np.ones(k) / np.sqrt(k)  # fixed start vector: deterministic results
    if which == "largest":
        gram = np.triu(gram) + np.triu(gram, 1).T
        evals, evecs = eigsh(gram, k=rank, which="LA", v0=v0)
    else:
        # Shift-invert around a point just below the spectrum: the smallest eigenvalues of G become the largest of
        # (G + tau I)^{-1}, and Lanczos converges on them in a few dozen Cholesky solves. tau > 0 keeps the factor
        # positive definite for rank-deficient weights.
        diagonal = np.diag_indices(k)
        tau = 1e-10 * float(gram[diagonal].sum()) / k + 1e-300
        gram[diagonal] += tau
        factor, info = lapack.dpotrf(gram, lower=0, overwrite_a=1, clean=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"Cholesky factorisation failed (LAPACK info {info}): the weight has "
                                        "non-finite values")

        def solve(x: np.ndarray) -> np.ndarray:
            # (R^T R)^{-1} x as two triangular solves: dpotrs on one vector goes through a blocked solve whose
            # set-up costs ~3x these two BLAS-2 calls, and Lanczos makes a few dozen of them.
            y = blas.dtrsv(factor, x, lower=0, trans=1)
            return blas.dtrsv(factor, y, lower=0, trans=0, overwrite_x=1)

        inv = LinearOperator((k, k), matvec=solve, dtype=np.float64)
        # tol: Ritz values to 1e-10 relative leave the vectors accurate to ~1e-12, far below the float32 output.
        inv_evals, evecs = eigsh(inv, k=rank, which="LA", v0=v0, tol=1e-10)
        evals = 1.0 / inv_evals - tau
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], np.asfortranarray(evecs[:, order])
    projected = blas.dgemm(1.0, a_np, evecs)  # (l, r)
    return torch.from_numpy(evals), torch.from_numpy(evecs), torch.from_numpy(projected)


def _cache_key(weight: torch.Tensor, rank: int, which: str, method: str, basis: str = "weight") -> str:
    digest = hashlib.blake2b(digest_size=20)
    data = weight.detach().contiguous().cpu()
    # The weight basis keeps the key it always had, so existing caches stay valid.
    suffix = "" if basis == "weight" else f"|{basis}"
    digest.update(f"{tuple(data.shape)}|{data.dtype}|{rank}|{which}|{method}|v1{suffix}".encode())
    digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()
