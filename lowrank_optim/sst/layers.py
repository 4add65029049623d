"""``SpectralLinear``: a linear layer kept as ``W = U diag(S) V^T`` (Sparse Spectral Training).

The layer stores all ``k = min(out, in)`` singular triplets, so converting an ``nn.Linear`` is
exact (up to the SVD's fp32 rounding).  Its backward gives SST's *enhanced* gradients for the
singular vectors: with ``G = dL/dW``, ``U.grad = G V`` and ``V.grad = G^T U`` (the true partial
derivatives carry an extra ``diag(S)`` factor, which SST drops so that a vector's step does not
vanish with its singular value), and ``S.grad_i = u_i^T G v_i``.  The enhanced gradients are
computed directly, never by dividing by ``S``, so they are exact where ``S_i = 0``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def svd_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``matrix = U diag(S) V^T`` computed in fp32 (or fp64 for fp64 input).

    Returns
    -------
    U, S, V
        ``(m, k)``, ``(k,)`` and ``(n, k)`` with ``k = min(m, n)``, in the computation dtype.
    """
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u, s, vh.t()


def spectral_product(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``U diag(S) V^T`` in fp32 (fp64 for fp64 factors)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    return (u.to(dtype) * s.to(dtype)) @ v.to(dtype).t()


class _SpectralMatmul(torch.autograd.Function):
    """``h = (x V) diag(S) U^T`` with SST's gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                enhanced: bool) -> torch.Tensor:
        z = x @ v  # (..., k): coordinates along the right singular vectors
        ctx.save_for_backward(x, z, u, s, v)
        ctx.enhanced = enhanced
        return (z * s) @ u.t()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, z, u, s, v = ctx.saved_tensors
        dtype = grad_out.dtype  # under autocast the saved operands may differ in dtype
        gy = grad_out @ u.to(dtype)  # dL/d(z * s), (..., k)
        z = z.to(dtype)
        need_x, need_u, need_s, need_v, _ = ctx.needs_input_grad
        grad_x = grad_u = grad_s = grad_v = None
        if need_x:
            grad_x = ((gy * s.to(dtype)) @ v.to(dtype).t()).to(x.dtype)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        flat_z, flat_gy = z.reshape(-1, z.shape[-1]), gy.reshape(-1, gy.shape[-1])
        if need_s:
            grad_s = (flat_gy * flat_z).sum(0).to(s.dtype)  # u_i^T G v_i
        scale = None if ctx.enhanced else s.to(dtype)
        if need_u:
            grad_u = flat_out.t() @ flat_z  # G V
            grad_u = (grad_u if scale is None else grad_u * scale).to(u.dtype)
        if need_v:
            grad_v = x.reshape(-1, x.shape[-1]).to(dtype).t() @ flat_gy  # G^T U
            grad_v = (grad_v if scale is None else grad_v * scale).to(v.dtype)
        return grad_x, grad_u, grad_s, grad_v, None


class SpectralLinear(nn.Module):
    """``y = x V diag(S) U^T + b``: an ``nn.Linear`` in its singular-value parameterisation.

    Parameters ``U`` ``(out, k)``, ``S`` ``(k,)`` and ``V`` ``(in, k)`` with
    ``k = min(in, out)``; the columns of ``U`` and ``V`` (the rows of ``V^T``) are the singular
    vectors.  Build one from a trained or freshly initialised layer with :meth:`from_linear`
    (or convert a whole model with :func:`lowrank_optim.sst.convert`) and turn it back into an
    ``nn.Linear`` with :meth:`to_linear`.

    Parameters
    ----------
    in_features, out_features
        As for ``nn.Linear``.
    bias
        Whether the layer has an additive bias (trained like any other parameter).
    enhanced_grad
        ``True`` (default): ``U.grad = G V`` and ``V.grad = G^T U`` (SST's enhanced gradient,
        ``G = dL/dW``).  ``False``: the true partial derivatives ``G V diag(S)`` and
        ``G^T U diag(S)``.  ``S.grad`` is the true ``diag(U^T G V)`` either way.
    rank
        The SST rank this layer was converted for (metadata read by
        :func:`lowrank_optim.optim.sst.sst_param_groups`; ``None`` if not set).
    device, dtype
        Factory arguments, as for ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        enhanced_grad: bool = True,
        rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        k = min(in_features, out_features)
        self.U = nn.Parameter(torch.empty(out_features, k, **factory))
        self.S = nn.Parameter(torch.empty(k, **factory))
        self.V = nn.Parameter(torch.empty(in_features, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.enhanced_grad = enhanced_grad
        self.rank = rank

    @property
    def k(self) -> int:
        """Number of singular triplets, ``min(in_features, out_features)``."""
        return self.S.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | None = None,
                    enhanced_grad: bool = True) -> SpectralLinear:
        """The exact spectral form of ``linear``: ``U, S, V`` from the SVD of its weight."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    enhanced_grad=enhanced_grad, rank=rank, device=w.device, dtype=w.dtype)
        layer.set_weight(w.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        for p in layer.parameters():
            p.requires_grad_(w.requires_grad)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Set ``U, S, V`` in place from the SVD of ``weight`` ``(out, in)``."""
        u, s, v = svd_factors(weight)
        self.U.copy_(u)
        self.S.copy_(s)
        self.V.copy_(v)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight ``U diag(S) V^T`` ``(out, in)`` in the parameters' dtype."""
        return spectral_product(self.U, self.S, self.V).to(self.U.dtype)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (for inference and export)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(self.U.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _SpectralMatmul.apply(x, self.U, self.S, self.V, self.enhanced_grad)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"bias={self.bias is not None}, rank={self.rank}")

