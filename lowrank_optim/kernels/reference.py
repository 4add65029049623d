"""Pure-torch reference implementations of the kernels: the specification.

:mod:`lowrank_optim.kernels.dispatch` runs these for everything but CUDA tensors (and when
``LOWRANK_OPTIM_KERNELS=torch``); the Triton kernels are tested against them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# block-wise 8-bit quantisation: the specification is lowrank_optim.kernels.blockwise itself
from lowrank_optim.kernels.blockwise import dequantize as dequantize_blockwise
from lowrank_optim.kernels.blockwise import quantize as quantize_blockwise


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Low-rank image of ``grad``: ``grad @ basis.T`` (right) or ``basis.T @ grad`` (left)."""
    if side == "right":
        return grad @ basis.t()
    return basis.t() @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Full-size image of ``low``: ``low @ basis`` (right) or ``basis @ low`` (left)."""
    if side == "right":
        return low @ basis
    return basis @ low


@contextmanager
def decoupled_decay(
    param: torch.Tensor, decay_before: float = 0.0, decay_after: float = 0.0
) -> Iterator[None]:
    """Decoupled weight decay around the update made inside the ``with`` block.

    ``param *= 1 - decay_before`` on entry (torch.optim.AdamW's order) and
    ``param -= decay_after * param`` on exit (galore-torch's order, written as its
    ``param.add_(param, alpha=-decay)``); a zero decay costs nothing.  The one statement of
    the decay semantics: the fused kernels reproduce it, the core and projectors use it.
    """
    if decay_before:
        param.mul_(1.0 - decay_before)
    yield
    if decay_after:
        param.add_(param, alpha=-decay_after)


def project_back_update(
    param: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float,
    decay_before: float = 0.0, decay_after: float = 0.0,
) -> None:
    """``param += alpha * project_back(low)`` as one accumulate-GEMM (no full-size temporary),
    inside :func:`decoupled_decay` with ``decay_before`` / ``decay_after``."""
    with decoupled_decay(param, decay_before, decay_after):
        if side == "right":
            param.addmm_(low, basis, alpha=alpha)
        else:
            param.addmm_(basis, low, alpha=alpha)


def update_param(
    param: torch.Tensor, direction: torch.Tensor, alpha: float,
    decay_before: float = 0.0, decay_after: float = 0.0,
) -> None:
    """``param += alpha * direction`` inside :func:`decoupled_decay`: the update of a parameter
    without projection (the identity-basis sibling of :func:`project_back_update`)."""
    with decoupled_decay(param, decay_before, decay_after):
        param.add_(direction, alpha=alpha)


def adam_update(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    beta1: float, beta2: float, eps: float, formula: str = "galore",
    bias_correction2: float = 1.0,
) -> torch.Tensor:
    """Advance Adam's moments in place and return the normalized direction ``N``.

    ``M <- beta1 M + (1 - beta1) G``, ``V <- beta2 V + (1 - beta2) G^2``; then
    ``N = M / (sqrt(V) + eps)`` (``formula="galore"``: eps before bias correction, which the
    caller folds into the step size) or ``N = M / (sqrt(V) / sqrt(bias_correction2) + eps)``
    (``formula="torch"``, ``torch.optim.AdamW``'s placement).  ``N`` has ``exp_avg_sq``'s dtype.
    """
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if formula == "torch":
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    else:
        denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom, out=denom)


def adam_update_8bit(
    grad: torch.Tensor, exp_avg_codes: torch.Tensor, exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor, exp_avg_sq_absmax: torch.Tensor,
    beta1: float, beta2: float, eps: float, formula: str = "galore",
    bias_correction2: float = 1.0, block_size: int = 256, code: str = "dynamic",
) -> torch.Tensor:
    """:func:`adam_update` on block-wise 8-bit moments, in place: dequantise (signed table for
    ``M``, unsigned for ``V``) -> fp32 moment update -> direction from the fp32 moments ->
    requantise into the codes and scales.  Returns the direction in ``grad``'s dtype."""
    m = dequantize_blockwise(exp_avg_codes, exp_avg_absmax, block_size, code, signed=True)
    v = dequantize_blockwise(exp_avg_sq_codes, exp_avg_sq_absmax, block_size, code,
                             signed=False)
    direction = adam_update(grad, m, v, beta1, beta2, eps, formula, bias_correction2)
    quantize_blockwise(m, block_size, code, True, out=(exp_avg_codes, exp_avg_absmax))
    quantize_blockwise(v, block_size, code, False, out=(exp_avg_sq_codes, exp_avg_sq_absmax))
    return direction.to(grad.dtype)


# -- DCT projection (SVD-free subspace selection) ----------------------------------------------
# The DCT basis ``basis`` is the orthonormal DCT-II matrix ``Q`` (n, n) with rows as frequencies:
# ``Q[k, j] = sqrt(2/n) cos(pi k (2j + 1) / (2n))``, row 0 scaled by 1/sqrt(2), i.e.
# ``scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)``.  The DCT coefficients of a
# gradient are ``S = G Q^T`` (right side: DCT-II of every row) or ``S = Q G`` (left side: DCT-II
# of every column); a selection ``idx`` of r frequencies is the GaLore-convention basis
# ``P = Q[idx]`` (right, shape (r, n)) or ``P = Q[idx]^T`` (left, shape (m, r)).


def dct2_fft(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` through a real FFT (Makhoul, 1980).

    Equals ``Q @ x`` along ``dim`` for the DCT-II matrix ``Q`` described above (and
    ``scipy.fft.dct(x, type=2, norm="ortho", axis=dim)``) in ``O(n log n)`` per vector instead
    of ``O(n^2)``.  Makhoul's reordering puts the even samples first and the odd ones reversed,
    ``v = [x0, x2, x4, ..., x5, x3, x1]``; with ``V = FFT(v)`` and ``Z_k = exp(-i pi k / 2n) V_k``
    the unnormalised transform is ``X_k = Re Z_k`` and ``X_{n-k} = -Im Z_k``, so the half
    spectrum of ``rfft`` suffices.  Half-precision inputs are computed (and returned) in fp32.

    Parameters
    ----------
    x
        Real tensor.
    dim
        Dimension to transform.

    Returns
    -------
    torch.Tensor
        The DCT-II coefficients, same shape as ``x``, dtype fp32 or fp64.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    dim = dim % x.dim()
    n = x.shape[dim]
    half_len = n // 2 + 1  # rfft bins k = 0 .. n // 2
    order = torch.cat([torch.arange(0, n, 2, device=x.device),  # even samples, then odd
                       torch.arange(1, n, 2, device=x.device).flip(0)])  # ones reversed
    spectrum = torch.fft.rfft(x.index_select(dim, order), dim=dim)
    bcast = [1] * x.dim()
    bcast[dim] = half_len
    k = torch.arange(half_len, device=x.device, dtype=x.dtype)
    z = spectrum * torch.polar(torch.ones_like(k), k * (-math.pi / (2 * n))).view(bcast)
    out = torch.empty_like(x)
    out.narrow(dim, 0, half_len).copy_(z.real)
    mirrored = torch.arange(n - half_len, 0, -1, device=x.device)  # X_{n-k} = -Im Z_k
    out.narrow(dim, half_len, n - half_len).copy_(z.imag.index_select(dim, mirrored)).neg_()
    out.mul_(math.sqrt(2.0 / n))
    out.narrow(dim, 0, 1).mul_(math.sqrt(0.5))
    return out


def dct_scores(coeffs: torch.Tensor, side: str, norm: str) -> torch.Tensor:
    """Alignment score of every basis vector with the gradient, from its DCT coefficients.

    ``coeffs`` is ``S = G Q^T`` (right: score column ``k`` over all rows) or ``S = Q G`` (left:
    score row ``k``).  ``norm="l2"`` gives ``||S[:, k]||_2``: the top-r l2 scores pick the r
    basis vectors that capture the most energy ``||G Q_I^T||_F^2``, which for an orthonormal
    basis minimises the residual ``||G - G Q_I^T Q_I||_F``.  ``norm="l1"`` gives ``||S[:, k]||_1``
    (the reference implementation's default heuristic).
    """
    return torch.linalg.vector_norm(
        coeffs, ord=2 if norm == "l2" else 1, dim=0 if side == "right" else 1
    )


def dct_scores_matmul(
    grad: torch.Tensor, basis: torch.Tensor, side: str, norm: str
) -> torch.Tensor:
    """:func:`dct_scores` of the matmul-route coefficients ``G Q^T`` (right) / ``Q G`` (left)
    of ``grad``, for callers that need only the scores: the Triton kernel never stores the
    coefficients (``m n`` elements) and returns fp32."""
    return dct_scores(project(grad, basis if side == "right" else basis.t(), side), side, norm)


def gather_lowrank(coeffs: torch.Tensor, idx: torch.Tensor, side: str) -> torch.Tensor:
    """Low-rank gradient read from the DCT coefficients: ``S[:, idx]`` (right) or ``S[idx]``
    (left), which equals ``project(G, P, side)`` for the indexed basis ``P`` without a matmul."""
    return coeffs.index_select(1 if side == "right" else 0, idx)


def indexed_basis(basis: torch.Tensor, idx: torch.Tensor, side: str) -> torch.Tensor:
    """GaLore-convention basis of the frequencies ``idx``: ``Q[idx]`` (right, (r, n)) or its
    transpose (left, (m, r)), for use with :func:`project` and friends."""
    rows = basis.index_select(0, idx)
    return rows if side == "right" else rows.t()


def project_indexed(
    grad: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str
) -> torch.Tensor:
    """``project(grad, P, side)`` for ``P = indexed_basis(basis, idx, side)``."""
    return project(grad, indexed_basis(basis, idx, side), side)


def project_back_indexed(
    low: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str
) -> torch.Tensor:
    """``project_back(low, P, side)`` for ``P = indexed_basis(basis, idx, side)``."""
    return project_back(low, indexed_basis(basis, idx, side), side)


def project_back_indexed_update(
    param: torch.Tensor,
    low: torch.Tensor,
    basis: torch.Tensor,
    idx: torch.Tensor,
    side: str,
    alpha: float,
    decay_before: float = 0.0,
    decay_after: float = 0.0,
) -> None:
    """``param += alpha * project_back_indexed(low, basis, idx, side)`` as one accumulate-GEMM
    (with the decoupled decays of :func:`project_back_update`)."""
    project_back_update(param, low, indexed_basis(basis, idx, side), side, alpha,
                        decay_before, decay_after)


def rotate_lowrank(t: torch.Tensor, rot: torch.Tensor, side: str) -> torch.Tensor:
    """Low-rank tensor ``t`` re-expressed in a new subspace: ``t @ rot`` (right, rank on the
    last axis) or ``rot^T @ t`` (left, rank on the first axis); ``rot`` is ``(r, r)`` with
    ``rot[a, b] = <old basis vector a, new basis vector b>``.  1-D ``t`` is a row (right) or a
    column (left) of rank-axis statistics."""
    return t @ rot if side == "right" else rot.t() @ t


# -- sampled columns (Sparse Spectral Training) ------------------------------------------------
# SST trains r sampled columns ``idx`` of a matrix of unit-norm singular vectors; the low-rank
# gradient is ``gather_lowrank(grad, idx, "right")`` (the columns ``grad[:, idx]``).


def scatter_add_columns_(
    param: torch.Tensor, idx: torch.Tensor, low: torch.Tensor, alpha: float,
    normalize: bool = False,
) -> None:
    """``param[:, idx] += alpha * low`` in place; with ``normalize`` the updated columns are then
    rescaled to unit l2 norm (norms computed in fp32; an all-zero column stays zero)."""
    low = low.to(param.dtype)
    if not normalize:
        param.index_add_(1, idx, low, alpha=alpha)
        return
    cols = param.index_select(1, idx).add_(low, alpha=alpha)
    norms = torch.linalg.vector_norm(cols, dim=0, keepdim=True, dtype=torch.float32)
    cols.div_(norms.clamp_min_(torch.finfo(torch.float32).tiny))
    param.index_copy_(1, idx, cols)
