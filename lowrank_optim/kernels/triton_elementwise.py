"""Elementwise Triton kernels: the Adam moment update and the unprojected parameter update.

``adam_update`` reads the (low-rank) gradient and both moments once and writes the moments and
the normalized direction once (the eager reference launches six or seven kernels, each a pass
over its operands).
``update_param`` is the identity-projection sibling of the fused back-projection: one pass for
``param * (1 - decay_before) + alpha * direction`` and the decay after.  Everything is computed
in fp32 and stored in each tensor's own dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowrank_optim.kernels.triton_common import configs, launch

_ELEMENTWISE_CONFIGS = configs(
    gpu=[dict(BLOCK=1024), dict(BLOCK=2048, num_warps=8), dict(BLOCK=4096, num_warps=8)],
    interpreted=dict(BLOCK=256),
    num_warps=4,
    num_stages=1,
)


@triton.jit
def adam_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """Adam's moment update in fp32 registers: ``(b1 M + (1 - b1) G, b2 V + (1 - b2) G^2)``
    (shared with the 8-bit kernel of :mod:`lowrank_optim.kernels.triton_quant`)."""
    return m * beta1 + one_minus_beta1 * g, v * beta2 + one_minus_beta2 * (g * g)


@triton.jit
def adam_direction(m, v, eps, denom_correction, TORCH_FORMULA: tl.constexpr):
    """``M / (sqrt(V) + eps)``, or ``M / (sqrt(V) / denom_correction + eps)`` (torch formula)."""
    denom = tl.sqrt_rn(v)
    if TORCH_FORMULA:
        denom = tl.div_rn(denom, denom_correction)
    return tl.div_rn(m, denom + eps)


@triton.autotune(_ELEMENTWISE_CONFIGS, key=["numel"], restore_value=["m_ptr", "v_ptr"])
@triton.jit
def _adam_kernel(
    g_ptr, m_ptr, v_ptr, n_ptr, numel, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    denom_correction,
    TORCH_FORMULA: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v = adam_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2)
    m = m.to(m_ptr.dtype.element_ty)
    v = v.to(v_ptr.dtype.element_ty)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    # the direction uses the moments as stored (rounded to their dtype), like the reference
    n = adam_direction(m.to(tl.float32), v.to(tl.float32), eps, denom_correction,
                       TORCH_FORMULA)
    tl.store(n_ptr + offs, n.to(n_ptr.dtype.element_ty), mask=mask)


@triton.autotune(_ELEMENTWISE_CONFIGS, key=["numel"], restore_value=["p_ptr"])
@triton.jit
def _update_kernel(p_ptr, d_ptr, numel, alpha, keep_before, decay_after, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * keep_before + alpha * d
    p = p - decay_after * p
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def _grid(numel: int):
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


def inplace(fn, *tensors: torch.Tensor) -> None:
    """Run ``fn`` on contiguous versions of ``tensors`` and copy back any that were copied."""
    flat = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    fn(*flat)
    for t, f in zip(tensors, flat, strict=True):
        if f is not t:
            t.copy_(f)


def adam_update(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    beta1: float, beta2: float, eps: float, formula: str = "galore",
    bias_correction2: float = 1.0,
) -> torch.Tensor:
    """Advance both moments in place and return the normalized direction; see the reference."""
    if not grad.shape == exp_avg.shape == exp_avg_sq.shape:
        raise ValueError(f"shape mismatch: grad {tuple(grad.shape)}, moments "
                         f"{tuple(exp_avg.shape)} / {tuple(exp_avg_sq.shape)}")
    direction = torch.empty_like(exp_avg_sq, memory_format=torch.contiguous_format)
    grad = grad.contiguous()
    numel = grad.numel()
    if numel == 0:
        return direction

    def run(m: torch.Tensor, v: torch.Tensor) -> None:
        launch(
            _adam_kernel, _grid(numel), grad, m, v, direction, numel, float(beta1), 1.0 - beta1,
            float(beta2), 1.0 - beta2, float(eps), math.sqrt(bias_correction2),
            TORCH_FORMULA=formula == "torch",
        )

    inplace(run, exp_avg, exp_avg_sq)
    return direction


def update_param(
    param: torch.Tensor, direction: torch.Tensor, alpha: float,
    decay_before: float = 0.0, decay_after: float = 0.0,
) -> None:
    """``param = param * (1 - decay_before) + alpha * direction``, then
    ``param -= decay_after * param``, in one pass."""
    if param.shape != direction.shape:
        raise ValueError(f"shape mismatch: param {tuple(param.shape)}, direction "
                         f"{tuple(direction.shape)}")
    numel = param.numel()
    if numel == 0:
        return
    direction = direction.contiguous()

    def run(p: torch.Tensor) -> None:
        launch(
            _update_kernel, _grid(numel), p, direction, numel, float(alpha),
            1.0 - float(decay_before), float(decay_after))

    inplace(run, param)
