"""Fira's rule (Chen et al., 2024, arXiv:2410.01623): GaLore's low-rank Adam update plus the
gradient's full-rank residual, scaled by how much Adam rescales the low-rank part."""

from __future__ import annotations

import torch

from lowrank_optim.rules import scaling
from lowrank_optim.rules.adam import Adam
from lowrank_optim.rules.base import Projection, Update


class Fira(Adam):
    """Full-rank training under a low-rank state: Adam on ``R = project(G)`` plus the
    residual ``G - back(R)``, which Adam never sees, scaled by Adam's norm ratio.

    With ``psi(R) = M_hat / (sqrt(V_hat) + eps)`` the low-rank Adam output (exactly
    :class:`~lowrank_optim.rules.Adam`'s step, so with the residual term removed this is
    GaLore's update bit for bit):

    * ``phi_j = ||psi(R)_j|| / ||R_j||`` per channel (``scale_type="channel"``, default:
      channels are indices of the axis the projection keeps) or one ``||psi(R)|| / ||R||``
      (``"tensor"``);
    * ``S = (G - back(R)) diag(phi)``, and the norm-growth limiter: if ``||S_t|| >
      norm_growth_limit * ||S_{t-1}||`` then ``S_t`` is rescaled to that bound;
    * ``W <- W - lr * scale * (back(psi(R)) + S)`` with Adam's decoupled weight decay.

    ``scale`` (the projection key) multiplies both terms.  Works over any projector with one
    projected side (SVD: ``fira_adamw``; DCT: ``dct_fira_adamw``); DCT's ``error_feedback``
    is refused (the residual is Fira's own full-rank term).  Costs one full-size temporary
    (the residual) per step of a projected weight.
    """

    name = "fira"
    elementwise = False
    full_gradient = True
    hyperparameters = (*Adam.hyperparameters, "scale_type", "norm_growth_limit")
    defaults = {**Adam.defaults, "eps": 1e-6, "weight_decay": 0.0, "formula": "galore",
                "scale_type": "channel", "norm_growth_limit": 1.01}
    extra_state = {scaling.LIMITER_KEY: "other"}

    def validate(self, group: dict) -> None:
        super().validate(group)
        scaling.check_settings(group)
        if group.get("error_feedback"):
            raise ValueError("error_feedback=True with Fira: Fira already adds the projection "
                             "residual at full rank every step; drop error_feedback.")

    def update(self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor,
               projection: Projection | None = None) -> Update:
        adam = super().update(low, state, group, param)
        if projection is None:  # an unprojected tensor: plain Adam
            return adam
        adapted = adam.direction * self.direction_scale(group, state)  # psi(R)
        residual = projection.grad - projection.back(low)
        ratio = scaling.limited_ratio(adapted, low, residual, projection.axis, state, group)
        adam.full, adam.full_scale, adam.full_alpha = residual, ratio, -group["lr"]
        return adam
