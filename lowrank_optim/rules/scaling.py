"""What APOLLO and Fira share: norm ratios measured in the projected space, per channel or for
the whole tensor, and the norm-growth limiter on the full-size term they add."""

from __future__ import annotations

import torch

from lowrank_optim.validation import check_choice

#: granularity of the ratios: one per channel (APOLLO, Fira) or one per tensor (APOLLO-Mini)
SCALE_TYPES = ("channel", "tensor")
#: state key of the limiter: the norm of the previous step's (limited) full-size term
LIMITER_KEY = "limiter_norm"
_TINY = torch.finfo(torch.float32).tiny


def check_settings(group: dict) -> None:
    """``scale_type`` in :data:`SCALE_TYPES`; ``norm_growth_limit`` ``None`` or a number >= 1."""
    check_choice("scale_type", group["scale_type"], SCALE_TYPES)
    if group.get("proj_type") == "full":
        raise ValueError("Invalid proj_type='full': channel scaling needs one projected side; "
                         "use proj_type='std' (or 'left' / 'right').")
    limit = group["norm_growth_limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not limit >= 1.0):
        raise ValueError(f"Invalid norm_growth_limit={limit!r}: pass a number >= 1 (the paper's "
                         "1.01: the full-size term's norm may grow by at most 1% per step), "
                         "or None to turn the limiter off.")


def norm_ratio(num: torch.Tensor, den: torch.Tensor, axis: int, scale_type: str
               ) -> torch.Tensor:
    """``||num_j|| / ||den_j||`` per channel (norms over ``axis``, kept as a broadcastable
    row or column), or one 0-d ``||num|| / ||den||`` for ``scale_type="tensor"``; fp32."""
    if scale_type == "tensor":
        return num.float().norm() / den.float().norm().clamp_min(_TINY)
    return (num.float().norm(dim=axis, keepdim=True)
            / den.float().norm(dim=axis, keepdim=True).clamp_min(_TINY))


def scaled_norm(full: torch.Tensor, ratio: torch.Tensor, axis: int) -> torch.Tensor:
    """``||full * ratio||`` without forming the product: the channel norms of ``full`` (over
    ``axis``) weighted by a per-channel ``ratio`` (or times a 0-d one); fp32 0-d."""
    if ratio.dim() == 0:
        return full.float().norm() * ratio
    return (full.float().norm(dim=axis, keepdim=True) * ratio).norm()


def limited(state: dict, norm: torch.Tensor, limit: float | None) -> torch.Tensor:
    """The factor (0-d, fp32, <= 1) that keeps a full-size term of norm ``norm`` within
    ``limit`` times the previous step's: ``min(1, limit * previous / norm)``, stored as the
    next previous norm (``state[LIMITER_KEY]``, after limiting).  The first step, a previous
    norm of 0 (which would freeze the term at 0 for good) and ``limit=None`` give 1.  No host
    synchronisation."""
    one = torch.ones((), dtype=torch.float32, device=norm.device)
    previous = state.get(LIMITER_KEY)
    if limit is None:
        return one
    if previous is None:
        factor = one
    else:
        cap = previous * limit
        factor = torch.where((previous > 0) & (norm > cap), cap / norm.clamp_min(_TINY), one)
    if previous is None:
        state[LIMITER_KEY] = (norm * factor).float()
    else:
        previous.copy_(norm * factor)
    return factor



def limited_ratio(adapted: torch.Tensor, low: torch.Tensor, full: torch.Tensor, axis: int,
                  state: dict, group: dict) -> torch.Tensor:
    """The scale of a full-size term ``full``: :func:`norm_ratio` of the rule's low-rank output
    ``adapted`` to its input ``low`` (group key ``scale_type``), times the limiter's factor
    for ``||full * ratio||`` (group key ``norm_growth_limit``, :func:`limited`)."""
    ratio = norm_ratio(adapted, low, axis, group["scale_type"])
    norm = scaled_norm(full, ratio, axis)
    return ratio * limited(state, norm, group["norm_growth_limit"])
