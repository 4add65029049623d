"""APOLLO's rule (Zhu et al., 2025, arXiv:2412.05270): Adam in the projected space only to
measure how much it rescales each channel, applied to the raw full-size gradient."""

from __future__ import annotations

import torch

from lowrank_optim.rules import scaling
from lowrank_optim.rules.adam import Adam
from lowrank_optim.rules.base import Projection, Update


class Apollo(Adam):
    """Structured learning-rate scaling estimated in a random low-rank space.

    For a projected weight with gradient ``G`` and projected gradient ``R`` (``R = P G``,
    :class:`~lowrank_optim.projectors.RandomProjector`), Adam's moments are kept for ``R``
    only and give ``R~ = M_hat / (sqrt(V_hat) + eps)``.  The step uses the full gradient:

    * ``scale_type="channel"`` (APOLLO): ``s_j = ||R~_j|| / ||R_j||`` for every channel ``j``
      (an index of the axis the projection keeps), ``G~ = G diag(s)``;
    * ``scale_type="tensor"`` (APOLLO-Mini, rank 1): one ``s = ||R~|| / ||R||``, ``G~ = s G``;
    * norm-growth limiter: if ``||G~_t|| > norm_growth_limit * ||G~_{t-1}||`` then ``G~_t`` is
      rescaled to that bound (``None``: off; the previous norm is the limited one);
    * ``W <- W - lr * scale * G~`` with Adam's decoupled weight decay (``formula``).

    ``scale`` (the projection key, the paper's ``alpha``) multiplies the update.  Parameters
    without projection get plain Adam (:class:`~lowrank_optim.rules.Adam`, same formula).
    State per projected weight: the two low-rank moments, the limiter's last norm (a 0-d
    fp32 tensor) and the projector's seed and step.
    """

    name = "apollo"
    elementwise = False
    full_gradient = True
    hyperparameters = (*Adam.hyperparameters, "scale_type", "norm_growth_limit")
    defaults = {**Adam.defaults, "weight_decay": 0.0, "scale_type": "channel",
                "norm_growth_limit": 1.01}
    extra_state = {scaling.LIMITER_KEY: "other"}

    def validate(self, group: dict) -> None:
        super().validate(group)
        scaling.check_settings(group)

    def update(self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor,
               projection: Projection | None = None) -> Update:
        adam = super().update(low, state, group, param)
        if projection is None:  # an unprojected tensor: plain Adam
            return adam
        adapted = adam.direction * self.direction_scale(group, state)  # R~
        ratio = scaling.limited_ratio(adapted, low, projection.grad, projection.axis, state,
                                      group)
        return Update(None, 0.0, decay=adam.decay, decay_first=adam.decay_first,
                      full=projection.grad, full_scale=ratio, full_alpha=-group["lr"])
