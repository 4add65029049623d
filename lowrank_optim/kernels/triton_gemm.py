"""Triton GEMMs for projection and for back-projection fused with the parameter update.

One kernel, ``C = epilogue(A @ B)`` with arbitrary strides (a transposed basis costs nothing)
and fp32 accumulation, serves every side:

- projection ``G P^T`` / ``P^T G`` and plain back-projection ``N P`` / ``P N`` store the
  product in the inputs' dtype (like ``torch.matmul``);
- the fused update reads the parameter tile once, applies
  ``C * (1 - decay_before) + alpha * (A @ B)`` then ``C - decay_after * C`` in fp32 and writes
  it back once: the full-size update ``back(N)`` never exists in memory, and the decoupled
  weight decay costs no extra pass over the weight.

The torch reference in :mod:`lowrank_optim.kernels.reference` is the specification.
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

_GEMM_CONFIGS = configs(
    gpu=[
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_stages=4),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_stages=4),
    ],
    interpreted=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    num_warps=4,
    num_stages=3,
)


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_rows_ptr, b_cols_ptr, k_idx_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    alpha, keep_before, decay_after,
    A_ROWS: tl.constexpr, B_COLS: tl.constexpr, A_K: tl.constexpr, B_K: tl.constexpr,
    UPDATE: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``C = A @ B`` (``UPDATE=False``) or the fused parameter update (``UPDATE=True``).

    Optional index vectors gather while loading: ``A_ROWS`` reads rows ``a_rows[i]`` of A,
    ``B_COLS`` columns ``b_cols[j]`` of B, ``A_K`` / ``B_K`` the reduction index ``k_idx[k]`` of
    A / B (the DCT projector's selected frequencies, so ``Q[idx]`` is never copied).
    """
    # grouped tile order: GROUP_M row-tiles share the B tiles they read while those sit in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/cols past the edge re-read valid ones (wrapped); their results are masked on store
    rows = offs_m % M
    cols = offs_n % N
    if A_ROWS:
        rows = tl.load(a_rows_ptr + rows)
    if B_COLS:
        cols = tl.load(b_cols_ptr + cols)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
    a_ptrs = a_rows + offs_k[None, :] * stride_ak
    b_ptrs = b_cols + offs_k[:, None] * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        if A_K:  # gathered reduction index: this block's pointers from the indices
            sel = tl.load(k_idx_ptr + k0 + offs_k, mask=k_ok, other=0).to(tl.int64)
            a_ptrs = a_rows + sel[None, :] * stride_ak
        if B_K:
            sel = tl.load(k_idx_ptr + k0 + offs_k, mask=k_ok, other=0).to(tl.int64)
            b_ptrs = b_cols + sel[:, None] * stride_bk
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = (c_ptr + offs_m[:, None].to(tl.int64) * stride_cm
              + offs_n[None, :].to(tl.int64) * stride_cn)
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if UPDATE:
        c = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        c = c * keep_before + alpha * acc
        c = c - decay_after * c
    else:
        c = acc
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=c_mask)


# the best tiles depend on the layout too (which operand is transposed): key on the strides
_KEY = ["M", "N", "K", "stride_am", "stride_bn"]
#: configs over the device's shared memory (consumer cards: 99 KB) are pruned before tuning
_PRUNE = {"early_config_prune": prune_shared(tile_shared_bytes)}
_gemm = triton.autotune(_GEMM_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_gemm_kernel)
# benchmarking candidate configs runs the kernel repeatedly: restore the updated parameter
_gemm_inplace = triton.autotune(_GEMM_CONFIGS, key=_KEY, restore_value=["c_ptr"],
                                prune_configs_by=_PRUNE)(_gemm_kernel)


def _launch(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *,
    a_rows: torch.Tensor | None = None, b_cols: torch.Tensor | None = None,
    a_k: torch.Tensor | None = None, b_k: torch.Tensor | None = None,
    alpha: float = 1.0, decay_before: float = 0.0, decay_after: float = 0.0,
    update: bool = False,
) -> None:
    """Launch the GEMM; an index vector replaces the extent of the dimension it selects."""
    if a_k is not None and b_k is not None:
        raise ValueError("gather the reduction index of A or of B, not both")
    k_idx = a_k if a_k is not None else b_k
    M = a.shape[0] if a_rows is None else a_rows.numel()
    N = b.shape[1] if b_cols is None else b_cols.numel()
    K = a.shape[1] if a_k is None else a_k.numel()
    K_b = b.shape[0] if b_k is None else b_k.numel()
    if K_b != K or tuple(c.shape) != (M, N):
        raise ValueError(f"shape mismatch: ({M}, {K}) @ ({K_b}, {N}) -> {tuple(c.shape)}")
    if M == 0 or N == 0:
        return
    dot_fp32, precision = dot_options(a, b)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    def index(t: torch.Tensor | None) -> torch.Tensor:
        return a if t is None else t.contiguous()  # unused pointers get any tensor

    kernel = _gemm_inplace if update else _gemm
    launch(
        kernel, grid, a, b, c, index(a_rows), index(b_cols), index(k_idx), M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        float(alpha), 1.0 - float(decay_before), float(decay_after),
        A_ROWS=a_rows is not None, B_COLS=b_cols is not None, A_K=a_k is not None,
        B_K=b_k is not None, UPDATE=update, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        GROUP_M=8,
    )


def _operands(low_or_grad: torch.Tensor, basis: torch.Tensor, side: str, back: bool) -> dict:
    """GEMM operands of (back-)projection with a basis ``P`` in the GaLore convention."""
    if back:  # low @ P (right) or P @ low (left)
        return dict(a=low_or_grad, b=basis) if side == "right" else dict(a=basis, b=low_or_grad)
    # grad @ P^T (right) or P^T @ grad (left)
    if side == "right":
        return dict(a=low_or_grad, b=basis.t())
    return dict(a=basis.t(), b=low_or_grad)


def _indexed_operands(
    x: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str, back: bool
) -> dict:
    """As :func:`_operands` for ``P = Q[idx]`` (right) / ``Q[idx]^T`` (left), gathered in the
    GEMM's loads instead of copied: ``basis`` is the full ``Q`` (n, n), rows as vectors."""
    if back:  # N @ Q[idx] (right) or Q[idx]^T @ N (left): the reduction runs over idx
        if side == "right":
            return dict(a=x, b=basis, b_k=idx)
        return dict(a=basis.t(), b=x, a_k=idx)
    if side == "right":  # G @ Q[idx]^T: columns idx of Q^T
        return dict(a=x, b=basis.t(), b_cols=idx)
    return dict(a=basis, b=x, a_rows=idx)  # Q[idx] @ G: rows idx of Q


def _product(operands: dict) -> torch.Tensor:
    a, b = operands["a"], operands["b"]
    rows = a.shape[0] if operands.get("a_rows") is None else operands["a_rows"].numel()
    cols = b.shape[1] if operands.get("b_cols") is None else operands["b_cols"].numel()
    out = torch.empty((rows, cols), device=a.device, dtype=torch.promote_types(a.dtype, b.dtype))
    _launch(c=out, **operands)
    return out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D operands of any strides, fp32 accumulation, result in their dtype."""
    return _product(dict(a=a, b=b))


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """``grad @ basis.T`` (right) or ``basis.T @ grad`` (left); see the reference."""
    return _product(_operands(grad, basis, side, back=False))


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """``low @ basis`` (right) or ``basis @ low`` (left); see the reference."""
    return _product(_operands(low, basis, side, back=True))


def project_back_update(
    param: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float,
    decay_before: float = 0.0, decay_after: float = 0.0,
) -> None:
    """``param = param * (1 - decay_before) + alpha * project_back(low)``, then
    ``param -= decay_after * param``, in one pass over ``param``."""
    _launch(c=param, alpha=alpha, decay_before=decay_before, decay_after=decay_after,
            update=True, **_operands(low, basis, side, back=True))


def project_indexed(
    grad: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str
) -> torch.Tensor:
    """``project(grad, P, side)`` for the DCT rows ``idx`` of ``basis``; see the reference."""
    return _product(_indexed_operands(grad, basis, idx, side, back=False))


def project_back_indexed(
    low: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str
) -> torch.Tensor:
    """``project_back(low, P, side)`` for the DCT rows ``idx`` of ``basis``."""
    return _product(_indexed_operands(low, basis, idx, side, back=True))


def project_back_indexed_update(
    param: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str,
    alpha: float, decay_before: float = 0.0, decay_after: float = 0.0,
) -> None:
    """:func:`project_back_update` for the DCT rows ``idx`` of ``basis``, one pass."""
    _launch(c=param, alpha=alpha, decay_before=decay_before, decay_after=decay_after,
            update=True, **_indexed_operands(low, basis, idx, side, back=True))
