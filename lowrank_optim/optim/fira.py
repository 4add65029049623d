"""Fira optimizers (Chen et al., 2024, arXiv:2410.01623): GaLore's state, full-rank updates.

Both classes are :func:`~lowrank_optim.optim.compose` of the Fira rule and a projector: their
keyword-only arguments are the declared hyper-parameters.
"""

from __future__ import annotations

from lowrank_optim.optim._hyperparameters import fill_doc
from lowrank_optim.optim.compose import compose
from lowrank_optim.projectors.dct import DCTProjector
from lowrank_optim.projectors.svd import SVDProjector
from lowrank_optim.rules.fira import Fira


@fill_doc
class FiraAdamW(compose(Fira, SVDProjector, name="FiraAdamW")):
    """Fira over GaLore's SVD subspaces: GaLore's low-rank AdamW step plus the gradient's
    residual outside the subspace, scaled per channel by Adam's norm ratio, under a
    norm-growth limiter (see :class:`~lowrank_optim.rules.Fira`).

    The state is GaLore's (the basis and two low-rank moments per weight, plus the limiter's
    norm); the update is full-rank.  The defaults are :class:`~lowrank_optim.GaLoreAdamW`'s
    (galore-torch's: eps 1e-6, no weight decay, ``formula="galore"``, ``scale=1.0``; the
    paper uses 0.25, as ``create_optimizer`` does); every argument is keyword-only.

    Parameters
    ----------
    {params}
    {adam}
    {apollo}
    {lowbit}
    {svd}
    {nonfinite}

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    >>> opt = FiraAdamW(groups, lr=1e-2)
    """


@fill_doc
class DCTFiraAdamW(compose(Fira, DCTProjector, name="DCTFiraAdamW", eps=1e-8,
                           formula="torch", update_proj_gap=1, scale=1.0)):
    """Fira over DCT subspaces (no SVD): :class:`~lowrank_optim.DCTAdamW`'s low-rank step plus
    Fira's scaled full-rank residual, with DCTAdamW's defaults (eps 1e-8, ``formula="torch"``,
    a re-selection every step, ``scale=1.0``).  ``error_feedback`` is refused (the residual
    is Fira's own term).

    Parameters
    ----------
    {params}
    {adam}
    {apollo}
    {dct}
    {lowbit}
    {nonfinite}
    """
