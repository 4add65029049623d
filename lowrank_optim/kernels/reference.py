"""Pure-torch reference implementations of the projection operations."""

from __future__ import annotations

import torch


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


def project_back_update(
    param: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float
) -> None:
    """``param += alpha * project_back(low)`` as one accumulate-GEMM (no full-size temporary)."""
    if side == "right":
        param.addmm_(low, basis, alpha=alpha)
    else:
        param.addmm_(basis, low, alpha=alpha)
