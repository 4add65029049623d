"""Triton kernels for block-wise 8-bit optimizer state.

Each program handles ``ROWS`` quantisation blocks as a ``ROWS x BLOCK`` tile (``BLOCK`` the
block size rounded up to a power of two, the extra columns masked), so a block's absmax is one
row reduction in registers:

- ``quantize_blockwise`` / ``dequantize_blockwise``: the torch reference
  (:mod:`lowrank_optim.kernels.blockwise`) in one pass;
- ``adam_update_8bit``: dequantise both moments -> Adam's moment update -> the normalized
  direction -> requantise, one read of the gradient, codes and scales and one write of the
  codes, scales and direction per element; the fp32 moments exist only in registers.

The tables come from :func:`lowrank_optim.blockwise.table` / ``midpoints`` (256 + 255 fp32
values, read through the cache); a code is found by an 8-step binary search over the
midpoints, which equals ``torch.bucketize``'s count of midpoints below the value.  Values lying
exactly on a midpoint may round to either neighbour when the two backends' fp32 arithmetic
differs in the last bit (the dequantised error bound holds either way).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowrank_optim.kernels import blockwise
from lowrank_optim.kernels.triton_common import INTERPRET, launch
from lowrank_optim.kernels.triton_elementwise import adam_direction, adam_moments, inplace

#: elements per program (a tile of whole blocks): small under the interpreter
_TILE = 256 if INTERPRET else 2048
_TINY = torch.finfo(torch.float32).tiny


def _layout(numel: int, block_size: int) -> tuple[int, int, int, tuple[int]]:
    """``(BLOCK, ROWS, num_warps, grid)`` for a tensor of ``numel`` elements."""
    block = triton.next_power_of_2(block_size)
    rows = max(1, _TILE // block)
    warps = 8 if rows * block >= 4096 else 4
    grid = (triton.cdiv(blockwise.num_blocks(numel, block_size), rows),)
    return block, rows, warps, grid


@triton.jit
def _tile(numel, num_blocks, block_size, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Block indices of this program, element offsets of its tile and their masks."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < num_blocks
    offs = rows[:, None] * block_size + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < block_size) & (offs < numel)
    return rows, row_ok, offs, mask


@triton.jit
def _dequantize(codes_ptr, absmax_ptr, table_ptr, rows, row_ok, offs, mask):
    """fp32 values of a tile: ``table[code] * absmax`` (0 outside the mask)."""
    c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)
    return tl.where(mask, tl.load(table_ptr + c) * scale[:, None], 0.0)


@triton.jit
def _quantize(x, mids_ptr, codes_ptr, absmax_ptr, rows, row_ok, offs, mask, tiny):
    """Store the codes and per-block absmax of the fp32 tile ``x`` (0 outside the mask)."""
    x = tl.where(mask, x, 0.0)
    absmax = tl.max(tl.abs(x), axis=1)
    normed = tl.div_rn(x, tl.maximum(absmax, tiny)[:, None])
    code = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):  # code = #{midpoints < normed}, searched 128, 64, ..., 1
        cand = code + (128 >> i)
        code = tl.where(tl.load(mids_ptr + cand - 1) < normed, cand, code)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, absmax_ptr, mids_ptr, numel, num_blocks, block_size, tiny,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, row_ok, offs, mask = _tile(numel, num_blocks, block_size, ROWS, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _quantize(x, mids_ptr, codes_ptr, absmax_ptr, rows, row_ok, offs, mask, tiny)


@triton.jit
def _dequantize_kernel(
    codes_ptr, absmax_ptr, table_ptr, out_ptr, numel, num_blocks, block_size,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, row_ok, offs, mask = _tile(numel, num_blocks, block_size, ROWS, BLOCK)
    x = _dequantize(codes_ptr, absmax_ptr, table_ptr, rows, row_ok, offs, mask)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adam_8bit_kernel(
    g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, n_ptr, m_table, m_mids, v_table, v_mids,
    numel, num_blocks, block_size, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    denom_correction, tiny,
    TORCH_FORMULA: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, row_ok, offs, mask = _tile(numel, num_blocks, block_size, ROWS, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = _dequantize(mc_ptr, ma_ptr, m_table, rows, row_ok, offs, mask)
    v = _dequantize(vc_ptr, va_ptr, v_table, rows, row_ok, offs, mask)
    m, v = adam_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2)
    # like the reference, the direction uses the fp32 moments, before requantisation
    n = adam_direction(m, v, eps, denom_correction, TORCH_FORMULA)
    tl.store(n_ptr + offs, n.to(n_ptr.dtype.element_ty), mask=mask)
    _quantize(m, m_mids, mc_ptr, ma_ptr, rows, row_ok, offs, mask, tiny)
    _quantize(v, v_mids, vc_ptr, va_ptr, rows, row_ok, offs, mask, tiny)


def _check_state(codes: torch.Tensor, absmax: torch.Tensor, numel: int, block_size: int) -> None:
    if codes.dtype != torch.uint8 or codes.numel() != numel:
        raise ValueError(f"codes must be uint8 with {numel} elements, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    blocks = blockwise.num_blocks(numel, block_size)
    if absmax.dtype != torch.float32 or absmax.numel() != blocks:
        raise ValueError(f"absmax must be fp32 with ceil({numel} / {block_size}) = {blocks} "
                         f"elements, got {absmax.dtype} {tuple(absmax.shape)}")


def quantize_blockwise(
    x: torch.Tensor, block_size: int = 256, code: str = "dynamic", signed: bool = True,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of ``x``; see :func:`lowrank_optim.kernels.blockwise.quantize`."""
    numel = x.numel()
    if out is None:
        out = (torch.empty(x.shape, dtype=torch.uint8, device=x.device),
               torch.empty(blockwise.num_blocks(numel, block_size), dtype=torch.float32,
                           device=x.device))
    _check_state(*out, numel, block_size)
    if numel == 0:
        return out
    x = x.contiguous()
    mids = blockwise.midpoints(code, signed, x.device)
    block, rows, warps, grid = _layout(numel, block_size)

    def run(codes: torch.Tensor, absmax: torch.Tensor) -> None:
        launch(_quantize_kernel, grid, x, codes, absmax, mids, numel, absmax.numel(),
               block_size, _TINY, ROWS=rows, BLOCK=block, num_warps=warps)

    inplace(run, *out)
    return out


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 256, code: str = "dynamic",
    signed: bool = True, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 values of ``codes``; see :func:`lowrank_optim.kernels.blockwise.dequantize`."""
    numel = codes.numel()
    _check_state(codes, absmax, numel, block_size)
    if out is None:
        out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    if numel == 0:
        return out
    codes, absmax = codes.contiguous(), absmax.contiguous()
    values = blockwise.table(code, signed, codes.device)
    block, rows, warps, grid = _layout(numel, block_size)

    def run(o: torch.Tensor) -> None:
        launch(_dequantize_kernel, grid, codes, absmax, values, o, numel, absmax.numel(),
               block_size, ROWS=rows, BLOCK=block, num_warps=warps)

    inplace(run, out)
    return out


def adam_update_8bit(
    grad: torch.Tensor, exp_avg_codes: torch.Tensor, exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor, exp_avg_sq_absmax: torch.Tensor,
    beta1: float, beta2: float, eps: float, formula: str = "galore",
    bias_correction2: float = 1.0, block_size: int = 256, code: str = "dynamic",
) -> torch.Tensor:
    """Fused dequantise -> Adam -> requantise; see the reference
    :func:`lowrank_optim.kernels.reference.adam_update_8bit`."""
    numel = grad.numel()
    for codes, absmax in ((exp_avg_codes, exp_avg_absmax), (exp_avg_sq_codes, exp_avg_sq_absmax)):
        _check_state(codes, absmax, numel, block_size)
    direction = torch.empty_like(grad, memory_format=torch.contiguous_format)
    if numel == 0:
        return direction
    grad = grad.contiguous()
    device = grad.device
    block, rows, warps, grid = _layout(numel, block_size)

    def run(mc: torch.Tensor, ma: torch.Tensor, vc: torch.Tensor, va: torch.Tensor) -> None:
        launch(
            _adam_8bit_kernel, grid, grad, mc, ma, vc, va, direction,
            blockwise.table(code, True, device), blockwise.midpoints(code, True, device),
            blockwise.table(code, False, device), blockwise.midpoints(code, False, device),
            numel, ma.numel(), block_size, float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2,
            float(eps), math.sqrt(bias_correction2), _TINY,
            TORCH_FORMULA=formula == "torch", ROWS=rows, BLOCK=block, num_warps=warps,
        )

    inplace(run, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    return direction
