"""APOLLO optimizers (Zhu et al., 2025, arXiv:2412.05270): SGD-like memory, AdamW-like steps."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lowrank_optim.optim._hyperparameters import fill_doc, group_defaults
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.projectors.random import RandomProjector
from lowrank_optim.rules.apollo import Apollo

#: APOLLO-Mini's ``scale`` (the paper's gradient scale factor ``alpha = sqrt(128)`` for rank 1)
APOLLO_MINI_SCALE = math.sqrt(128.0)


@fill_doc
class ApolloAdamW(LowRankOptimizer):
    """APOLLO: AdamW's per-channel step sizes estimated from a random low-rank projection.

    Each projected weight keeps Adam's moments of ``R = P G`` (``P`` Gaussian, redrawn every
    ``update_proj_gap`` steps from a stored seed: no matrix is stored) and steps with the raw
    gradient scaled per channel, ``G diag(||R~_j|| / ||R_j||)``, under a norm-growth limiter
    (see :class:`~lowrank_optim.rules.Apollo`).  Groups opt in with ``rank`` (the paper: 256
    for LLaMA-1B-7B, a quarter of GaLore's usual); groups without it and 1-D parameters get
    plain AdamW.

    Parameters
    ----------
    {params}
    {adam}
        ``formula="torch"`` (default) is the paper's ``M_hat / (sqrt(V_hat) + eps)`` with
        decay from the previous weights; ``"galore"`` is galore-torch's placement of eps.
    {apollo}
        ``scale_type=None`` takes the class's (``"channel"``; APOLLO-Mini: ``"tensor"``).
    update_proj_gap, scale, proj_type, proj_seed
        Steps between random draws (default 200), the factor on the update (the paper's
        ``alpha``; ``None`` takes the class's: 1.0, APOLLO-Mini sqrt(128)), the projected side
        (``"std"``: the smaller dimension, so channels are the larger one) and the seed the
        draws derive from (see :class:`~lowrank_optim.projectors.RandomProjector`).  Group
        keys win over these defaults.
    {lowbit}
    {nonfinite}

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=256, update_proj_gap=200, scale=1.0)
    >>> opt = ApolloAdamW(groups, lr=1e-2)
    """

    projector_type = RandomProjector
    #: default ``scale_type`` of the class
    scale_type = "channel"
    #: default ``scale`` of the class (the paper's ``alpha``)
    default_scale = 1.0

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        formula: str = "torch",
        *,
        scale_type: str | None = None,
        norm_growth_limit: float | None = 1.01,
        update_proj_gap: int | None = 200,
        scale: float | None = None,
        proj_type: str = "std",
        proj_seed: int = 0,
        bits: int = 32,
        block_size: int = 256,
        code: str = "dynamic",
        min_8bit_size: int = 4096,
        nonfinite: str = "raise",
    ) -> None:
        scale_type = self.scale_type if scale_type is None else scale_type
        scale = self.default_scale if scale is None else scale
        defaults = group_defaults(locals(), Apollo, self.projector_type)
        super().__init__(params, defaults, Apollo(), self.projector_type(), nonfinite=nonfinite)


@fill_doc
class ApolloMini(ApolloAdamW):
    """APOLLO-Mini: :class:`ApolloAdamW` at rank 1 with one scaling factor per tensor.

    Same arguments; the defaults differ: ``scale_type="tensor"`` and ``scale=sqrt(128)`` (the
    paper's gradient scale factor for rank 1, which compensates for a rank-1 estimate of the
    ratio).  Give the projected groups ``rank=1`` (:func:`lowrank_optim.create_optimizer`
    does for ``"apollo_mini"``).  Optimizer state per projected ``m x n`` weight: two moments
    of ``max(m, n)`` elements, the limiter's norm and three integers.

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=1, update_proj_gap=200,
    ...                                     scale=ApolloMini.default_scale)
    >>> opt = ApolloMini(groups, lr=1e-2)
    """

    scale_type = "tensor"
    default_scale = APOLLO_MINI_SCALE
