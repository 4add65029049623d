"""Fira optimizers (Chen et al., 2024, arXiv:2410.01623): GaLore's state, full-rank updates."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowrank_optim.optim._hyperparameters import fill_doc, group_defaults
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.projectors.dct import DCTProjector
from lowrank_optim.projectors.svd import SVDProjector
from lowrank_optim.rules.fira import Fira


@fill_doc
class FiraAdamW(LowRankOptimizer):
    """Fira over GaLore's SVD subspaces: GaLore's low-rank AdamW step plus the gradient's
    residual outside the subspace, scaled per channel by Adam's norm ratio, under a
    norm-growth limiter (see :class:`~lowrank_optim.rules.Fira`).

    The state is GaLore's (the basis and two low-rank moments per weight, plus the limiter's
    norm); the update is full-rank.  Same arguments and defaults as
    :class:`~lowrank_optim.GaLoreAdamW` plus the scaling keys.

    Parameters
    ----------
    {params}
    {adam}
        The defaults are galore-torch's (eps 1e-6, no weight decay, ``formula="galore"``).
    {apollo}
    {lowbit}
    {svd}
    {nonfinite}

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    >>> opt = FiraAdamW(groups, lr=1e-2)
    """

    projector_type = SVDProjector

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        formula: str = "galore",
        *,
        scale_type: str = "channel",
        norm_growth_limit: float | None = 1.01,
        bits: int = 32,
        block_size: int = 256,
        code: str = "dynamic",
        min_8bit_size: int = 4096,
        svd_method: str = "exact",
        svd_oversample: int = 10,
        svd_power_iters: int | None = None,
        svd_seed: int = 0,
        proj_bits: int = 32,
        proj_block_size: int = 256,
        nonfinite: str = "raise",
    ) -> None:
        defaults = group_defaults(locals(), Fira, self.projector_type)
        super().__init__(params, defaults, Fira(), self.projector_type(), nonfinite=nonfinite)


@fill_doc
class DCTFiraAdamW(LowRankOptimizer):
    """Fira over DCT subspaces (no SVD): :class:`~lowrank_optim.DCTAdamW`'s low-rank step plus
    Fira's scaled full-rank residual.  ``error_feedback`` is refused (the residual is Fira's
    own term).

    Parameters
    ----------
    {params}
    {adam}
        ``eps=1e-8`` and ``formula="torch"`` as :class:`~lowrank_optim.DCTAdamW`.
    {apollo}
    {dct}
    {lowbit}
    {nonfinite}
    """

    projector_type = DCTProjector

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
        scale_type: str = "channel",
        norm_growth_limit: float | None = 1.01,
        update_proj_gap: int | None = 1,
        scale: float = 1.0,
        proj_type: str = "std",
        score_norm: str = "l2",
        score_route: str = "auto",
        rotate_moments: bool = True,
        bits: int = 32,
        block_size: int = 256,
        code: str = "dynamic",
        min_8bit_size: int = 4096,
        nonfinite: str = "raise",
    ) -> None:
        defaults = group_defaults(locals(), Fira, self.projector_type)
        super().__init__(params, defaults, Fira(), self.projector_type(), nonfinite=nonfinite)
