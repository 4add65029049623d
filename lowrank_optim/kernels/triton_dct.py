"""Triton kernels for the SVD-free DCT projector: selection scores and index gathers.

``matmul_column_norms`` scores the columns of ``S = A @ B`` by their l2 or l1 norm without
ever storing ``S``: each program multiplies a column block over a strided subset of row blocks
and reduces the tile to per-column sums in registers; the ``splits`` partial rows are summed in
fp32 afterwards (deterministic, no atomics).  :func:`dct_scores_matmul` applies it to the DCT
coefficients ``G Q^T`` / ``Q G``.  :func:`index_select` gathers rows or columns (the selected
coefficients, the selected basis vectors).  The projection GEMMs with a gathered basis live in
:mod:`lowrank_optim.kernels.triton_gemm` (the gather happens in their loads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_optim.kernels.triton_common import (
    configs,
    dot_options,
    launch,
    prune_shared,
    tile_shared_bytes,
)

NORMS = ("l2", "l1")

_SCORE_CONFIGS = configs(
    gpu=[
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=4),
    ],
    interpreted=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    num_warps=4,
    num_stages=3,
)


@triton.autotune(_SCORE_CONFIGS, key=["M", "N", "K", "stride_am", "stride_bn"],
                 prune_configs_by={"early_config_prune": prune_shared(tile_shared_bytes)})
@triton.jit
def _column_norms_kernel(
    a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, splits,
    SQUARE: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[s, j] = sum_{i in row blocks s, s + splits, ...} f((A @ B)[i, j])``."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols = (offs_n % N).to(tl.int64)  # wrapped past the edge; masked on store
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for mb in range(pid_s, tl.cdiv(M, BLOCK_M), splits):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M  # rows past the edge load as zeros so they add nothing
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if SQUARE:
            total += tl.sum(acc * acc, axis=0)
        else:
            total += tl.sum(tl.abs(acc), axis=0)
    tl.store(out_ptr + pid_s * N + offs_n, total, mask=offs_n < N)


@triton.autotune(
    configs(gpu=[dict(BLOCK_R=64, BLOCK_C=64), dict(BLOCK_R=128, BLOCK_C=32)],
            interpreted=dict(BLOCK_R=16, BLOCK_C=16), num_warps=4, num_stages=1),
    key=["R", "C"],
)
@triton.jit
def _gather_columns_kernel(
    src_ptr, idx_ptr, out_ptr, R, C, n_src, stride_sr, stride_sc, stride_or, stride_oc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    idx = tl.load(idx_ptr + offs_c, mask=c_ok, other=0).to(tl.int64)
    mask = (offs_r[:, None] < R) & (c_ok & (idx >= 0) & (idx < n_src))[None, :]
    rows = offs_r[:, None].to(tl.int64)
    vals = tl.load(src_ptr + rows * stride_sr + idx[None, :] * stride_sc, mask=mask, other=0.0)
    tl.store(out_ptr + rows * stride_or + offs_c[None, :].to(tl.int64) * stride_oc, vals,
             mask=mask)


def _splits(m: int, n: int) -> int:
    """Row-block partitions: enough programs to fill a large GPU when ``n`` is small."""
    return max(1, min(triton.cdiv(m, 128), 1024 // triton.cdiv(n, 64)))


def matmul_column_norms(a: torch.Tensor, b: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """fp32 ``l2``/``l1`` norms of the columns of ``a @ b``, the product never stored."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    (M, K), (K2, N) = a.shape, b.shape
    if K2 != K:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} @ {tuple(b.shape)}")
    if M == 0 or N == 0:
        return torch.zeros(N, device=a.device, dtype=torch.float32)
    splits = _splits(M, N)
    partial = torch.empty((splits, N), device=a.device, dtype=torch.float32)
    dot_fp32, precision = dot_options(a, b)
    launch(
        _column_norms_kernel, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits), a, b,
        partial, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), splits,
        SQUARE=norm == "l2", DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )
    total = partial.sum(dim=0)
    return total.sqrt_() if norm == "l2" else total


def index_select(src: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``src.index_select(dim, idx)`` for a 2-D ``src``, as a new contiguous matrix.

    Indices are not range-checked (that would cost a host sync); out-of-range ones read zeros.
    """
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1 for a 2-D tensor, got {dim}")
    count = idx.numel()
    out = src.new_empty((src.shape[0], count) if dim == 1 else (count, src.shape[1]))
    # gather columns of (src, out), or of their transposes for rows
    s, o = (src, out) if dim == 1 else (src.t(), out.t())
    R = s.shape[0]
    if R == 0 or count == 0:
        return out
    launch(
        _gather_columns_kernel,
        lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(count, meta["BLOCK_C"])),
        s, idx.contiguous(), o, R, count, s.shape[1], s.stride(0), s.stride(1),
        o.stride(0), o.stride(1),
    )
    return out


def gather_lowrank(coeffs: torch.Tensor, idx: torch.Tensor, side: str) -> torch.Tensor:
    """``S[:, idx]`` (right) or ``S[idx]`` (left); see the reference."""
    return index_select(coeffs, 1 if side == "right" else 0, idx)


def indexed_basis(basis: torch.Tensor, idx: torch.Tensor, side: str) -> torch.Tensor:
    """``Q[idx]`` (right) or its transpose (left); see the reference."""
    rows = index_select(basis, 0, idx)
    return rows if side == "right" else rows.t()


def dct_scores_matmul(
    grad: torch.Tensor, basis: torch.Tensor, side: str, norm: str = "l2"
) -> torch.Tensor:
    """fp32 scores of the DCT coefficients ``G Q^T`` (right) / ``Q G`` (left), not stored."""
    if side == "right":  # column norms of G Q^T
        return matmul_column_norms(grad, basis.t(), norm)
    return matmul_column_norms(grad.t(), basis.t(), norm)  # row norms of Q G
