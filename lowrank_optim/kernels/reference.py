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
# (its quantize / dequantize are the dispatch's torch path under these names)
from lowrank_optim.kernels import blockwise
from lowrank_optim.kernels.blockwise import dequantize as dequantize_blockwise  # noqa: F401
from lowrank_optim.kernels.blockwise import quantize as quantize_blockwise  # noqa: F401


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
    requantise into the codes and scales.  Returns the direction in ``grad``'s dtype.

    Fused chunk by chunk (:class:`~lowrank_optim.kernels.blockwise.Workspace`): each chunk of
    whole blocks goes through all four steps before the next one, so the fp32 moments exist
    one chunk at a time (in cache), never at full size.  Each step is elementwise or per
    block, so the result is bit for bit :func:`dequantize_blockwise` -> :func:`adam_update` ->
    :func:`quantize_blockwise` on the whole tensors (``tests/test_8bit_speed_equivalence.py``).
    """
    direction = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    m_table = blockwise.table(code, True, grad.device)
    v_table = blockwise.table(code, False, grad.device)
    states = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    held = [blockwise.writable(t, dtype, keep=True)
            for t, dtype in zip(states, (torch.uint8, torch.float32) * 2, strict=True)]
    m_codes, m_absmax, v_codes, v_absmax = (t.view(-1) for t in held)
    flat_grad, flat_direction = grad.reshape(-1), direction.view(-1)
    with blockwise.Workspace(grad.numel(), block_size, grad.device) as work:
        for elems, blocks, chunk in work.chunks():
            m = blockwise.dequantize_chunk(chunk, 0, m_codes[elems], m_absmax[blocks], m_table)
            v = blockwise.dequantize_chunk(chunk, 1, v_codes[elems], v_absmax[blocks], v_table)
            # adam_update's operations, into the chunk's scratch: no allocation per chunk
            g = flat_grad[elems]
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = torch.sqrt(v, out=chunk.boundary)
            if formula == "torch":
                denom.div_(math.sqrt(bias_correction2))
            torch.div(m, denom.add_(eps), out=flat_direction[elems])
            blockwise.quantize_chunk(chunk, 0, code, True, m_codes[elems], m_absmax[blocks])
            blockwise.quantize_chunk(chunk, 1, code, False, v_codes[elems], v_absmax[blocks])
    for state, result in zip(states, held, strict=True):
        if state is not result:
            state.copy_(result)
    return direction


# -- DCT projection (SVD-free subspace selection) ----------------------------------------------
# The DCT basis ``basis`` is the orthonormal DCT-II matrix ``Q`` (n, n) with rows as frequencies:
# ``Q[k, j] = sqrt(2/n) cos(pi k (2j + 1) / (2n))``, row 0 scaled by 1/sqrt(2), i.e.
# ``scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)``.  The DCT coefficients of a
# gradient are ``S = G Q^T`` (right side: DCT-II of every row) or ``S = Q G`` (left side: DCT-II
# of every column); a selection ``idx`` of r frequencies is the GaLore-convention basis
# ``P = Q[idx]`` (right, shape (r, n)) or ``P = Q[idx]^T`` (left, shape (m, r)).


#: on the CPU the FFT route transforms the rows in blocks of about this many elements, so that
#: a block's reordered input, spectrum and score sums stay in cache from one pass to the next
#: (on other devices the whole tensor goes at once: one launch per operation)
DCT_FFT_BLOCK = 1 << 18


@functools.cache
def dct_fft_plan(
    n: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables of the size-``n`` FFT route, built once per size, device and real ``dtype``.

    Returns
    -------
    order : torch.Tensor
        ``(n,)`` int64 input permutation ``u_j = v_{-j mod n}``: Makhoul's reordering
        ``v = [x0, x2, x4, ..., x5, x3, x1]`` read cyclically backwards, so that the FFT of
        ``u`` is ``conj(V)`` for ``V = FFT(v)``.
    twiddle : torch.Tensor
        ``(n // 2 + 1,)`` complex ``sqrt(2/n) exp(+i pi k / 2n)``, times ``1/sqrt(2)`` at
        ``k = 0``: with ``Z_k = exp(-i pi k / 2n) V_k`` the unnormalised transform is
        ``X_k = Re Z_k`` and ``X_{n-k} = -Im Z_k``, so ``twiddle * conj(V)`` holds the
        orthonormal ``X_k`` in its real and ``X_{n-k}`` in its imaginary parts.
    packed : torch.Tensor
        ``(n,)`` int32 (the dtype of selected indices): the column of frequency ``k`` in the
        packed layout (the real view of the ``n // 2 + 1`` complex bins): ``2 k`` for
        ``k <= n // 2``, else ``2 (n - k) + 1``.
    """
    evens, odds = torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)
    order = torch.cat([evens, odds])[(-torch.arange(n)) % n]
    half = n // 2 + 1
    k = torch.arange(half, dtype=torch.float64)
    twiddle = torch.polar(torch.full_like(k, math.sqrt(2.0 / n)), k * (math.pi / (2 * n)))
    twiddle[0] *= math.sqrt(0.5)
    freq = torch.arange(n)
    packed = torch.where(freq < half, 2 * freq, 2 * (n - freq) + 1).to(torch.int32)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return order.to(device), twiddle.to(device=device, dtype=complex_dtype), packed.to(device)


def dct2_fft_rows(
    x: torch.Tensor, norm: str | None = None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal DCT-II of every row of the 2-D ``x`` through a real FFT, in the packed layout.

    Per block of rows (:data:`DCT_FFT_BLOCK` elements on the CPU): the reordering of
    :func:`dct_fft_plan` into a block buffer, the real FFT, its product with the twiddle
    factors written into ``out`` and, with ``norm``, the score sums while the block is in
    cache.  No full-size temporary besides ``out``; ``x`` may be the transposed view ``G^T``
    (the left side).  Half-precision inputs are computed in fp32.

    Parameters
    ----------
    x
        ``(rows, n)`` real tensor.
    norm
        ``"l2"``: also return the sum of squares of every packed column over the rows;
        ``"l1"``: the sum of absolute values; ``None``: no sums.  Both are additive over row
        shards.
    out
        Contiguous complex ``(rows, n // 2 + 1)`` buffer to write the spectrum into
        (fp32 inputs: complex64); allocated when ``None``.

    Returns
    -------
    packed : torch.Tensor
        ``(rows, 2 (n // 2 + 1))`` real view of ``out``: row ``j``, column
        ``dct_fft_plan(n, ...)[2][k]`` is ``X_k`` of row ``j`` (the other columns are unused).
    sums : torch.Tensor or None
        ``(2 (n // 2 + 1),)`` score sums per packed column, or ``None`` without ``norm``.
    """
    rows, n = x.shape
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    order, twiddle, _ = dct_fft_plan(n, x.device, work)
    half = n // 2 + 1
    if out is None:
        out = torch.empty(rows, half, dtype=twiddle.dtype, device=x.device)
    packed = torch.view_as_real(out).view(rows, 2 * half)
    on_cpu = x.device.type == "cpu"
    block = max(1, min(rows, DCT_FFT_BLOCK // n)) if on_cpu else max(1, rows)
    buf = torch.empty(min(block, rows), n, dtype=work, device=x.device)
    sums = (torch.empty(min(block, rows), 2 * half, dtype=work, device=x.device)
            if norm is not None and on_cpu else None)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        chunk = buf[: stop - start]
        if x.stride(1) != 1:  # G^T: reorder whole rows of G, then one transposing copy
            chunk.copy_(x[start:stop].t().index_select(0, order).t())
        elif x.dtype == work:
            torch.index_select(x[start:stop], 1, order, out=chunk)
        else:
            chunk.copy_(x[start:stop].index_select(1, order))
        # rfft(out=) would copy through a temporary: the twiddle product writes out instead
        torch.mul(torch.fft.rfft(chunk, dim=1), twiddle, out=out[start:stop])
        if sums is not None:  # accumulate while the block is in cache
            part, acc = packed[start:stop], sums[: stop - start]
            if start == 0 and norm == "l2":  # the first block initialises the sums
                torch.mul(part, part, out=acc)
            elif start == 0:
                torch.abs(part, out=acc)
            elif norm == "l2":
                acc.addcmul_(part, part)
            else:
                acc.add_(part.abs())
    if norm is None:
        return packed, None
    if sums is not None:
        return packed, sums.sum(0)
    total = torch.linalg.vector_norm(packed, ord=2 if norm == "l2" else 1, dim=0)
    return packed, total.square_() if norm == "l2" else total


def dct2_fft(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` through a real FFT (Makhoul, 1980).

    Equals ``Q @ x`` along ``dim`` for the DCT-II matrix ``Q`` described above (and
    ``scipy.fft.dct(x, type=2, norm="ortho", axis=dim)``) in ``O(n log n)`` per vector instead
    of ``O(n^2)``.  Makhoul's reordering puts the even samples first and the odd ones reversed,
    ``v = [x0, x2, x4, ..., x5, x3, x1]``; with ``V = FFT(v)`` and ``Z_k = exp(-i pi k / 2n) V_k``
    the unnormalised transform is ``X_k = Re Z_k`` and ``X_{n-k} = -Im Z_k``, so the half
    spectrum of ``rfft`` suffices (:func:`dct2_fft_rows` computes it, :func:`dct_fft_plan`
    holds the tables; this function unpacks the natural frequency order).  Half-precision
    inputs are computed (and returned) in fp32.

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
    dim = dim % x.dim()
    n = x.shape[dim]
    moved = x.movedim(dim, -1)
    packed, _ = dct2_fft_rows(moved.reshape(-1, n))
    natural = packed.index_select(1, dct_fft_plan(n, x.device, packed.dtype)[2])
    return natural.view(moved.shape).movedim(-1, dim).contiguous()


def dct_fft_coefficients(
    grad: torch.Tensor, side: str, norm: str, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FFT route's refresh inputs for a 2-D ``grad``: coefficients, scores, positions.

    One pass of :func:`dct2_fft_rows` over the rows of ``G`` (right) or of ``G^T`` (left)
    gives both the coefficients and the scores; nothing is unpacked.

    Parameters
    ----------
    grad
        ``(m, n)`` gradient (right side) or ``(n, C)`` (left side).
    side
        ``"right"`` (transform every row) or ``"left"`` (every column).
    norm
        ``"l2"`` or ``"l1"``.
    out
        Complex scratch buffer for the spectrum (see :func:`dct2_fft_rows`).

    Returns
    -------
    coeffs : torch.Tensor
        The coefficients in the packed layout, oriented like ``S``: columns are packed
        frequencies (right, ``(m, n + 2 - n % 2)``) or rows are (left, a transposed view).
    scores : torch.Tensor
        ``(n,)`` additive scores in frequency order: squared column norms of ``S`` (``"l2"``,
        the squares of :func:`dct_scores`) or l1 norms (``"l1"``); fp32 or fp64.
    positions : torch.Tensor
        ``(n,)`` int32 packed index of every frequency:
        ``gather_lowrank(coeffs, positions[idx], side)`` is the low-rank gradient ``S[:, idx]``
        (right) or ``S[idx]`` (left).
    """
    rows = grad if side == "right" else grad.t()
    packed, sums = dct2_fft_rows(rows, norm, out)
    positions = dct_fft_plan(rows.shape[1], grad.device, packed.dtype)[2]
    return (packed if side == "right" else packed.t()), sums.index_select(0, positions), positions


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


def selection_remap(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How a low-rank tensor moves from the selection ``old`` to ``new`` of one orthonormal
    basis: ``(source, kept)``, for slot ``b`` the old slot ``source[b]`` with
    ``old[source[b]] == new[b]`` and ``kept[b]`` (bool) whether there is one.

    For indices into one orthonormal basis the rotation ``<old basis vector a, new basis
    vector b>`` (:func:`rotate_lowrank`'s ``rot``) is exactly this 0/1 partial permutation.
    Computed from an ``r x r`` comparison (tiny, no host sync); ``source`` is 0 where not
    ``kept``.
    """
    match = old.to(new.device).unsqueeze(1) == new.unsqueeze(0)
    return match.to(torch.uint8).argmax(0), match.any(0)


def remap_lowrank_(
    t: torch.Tensor, source: torch.Tensor, kept: torch.Tensor, dim: int,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: slot ``b`` of ``t`` along ``dim`` takes slot ``source[b]``, or zero where not
    ``kept[b]`` (:func:`selection_remap`); returns ``t``.

    Equals :func:`rotate_lowrank` with the 0/1 rotation for finite ``t`` (a zeroed slot may
    come out as ``-0.0``), as one gather into ``scratch`` (``t``'s shape and dtype, not ``t``;
    a new temporary when ``None``) and one masked write back instead of an ``r x r`` matmul.
    """
    moved = t.index_select(dim, source) if scratch is None else torch.index_select(
        t, dim, source, out=scratch)
    shape = [1] * t.dim()
    shape[dim] = -1
    return torch.mul(moved, kept.view(shape), out=t)


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
