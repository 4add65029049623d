"""APOLLO optimizers (Zhu et al., 2025, arXiv:2412.05270): SGD-like memory, AdamW-like steps.

Both classes are :func:`~lowrank_optim.optim.compose` of the APOLLO rule and the random
projector: their keyword-only arguments are the declared hyper-parameters, so nothing of the
signature is written twice.
"""

from __future__ import annotations

import math

from lowrank_optim.optim._hyperparameters import fill_doc
from lowrank_optim.optim.compose import compose
from lowrank_optim.projectors.random import RandomProjector
from lowrank_optim.rules.apollo import Apollo

#: APOLLO-Mini's ``scale`` (the paper's gradient scale factor ``alpha = sqrt(128)`` for rank 1)
APOLLO_MINI_SCALE = math.sqrt(128.0)


@fill_doc
class ApolloAdamW(compose(Apollo, RandomProjector, name="ApolloAdamW")):
    """APOLLO: AdamW's per-channel step sizes estimated from a random low-rank projection.

    Each projected weight keeps Adam's moments of ``R = P G`` (``P`` Gaussian, redrawn every
    ``update_proj_gap`` steps from a stored seed: no matrix is stored) and steps with the raw
    gradient scaled per channel, ``G diag(||R~_j|| / ||R_j||)``, under a norm-growth limiter
    (see :class:`~lowrank_optim.rules.Apollo`).  Groups opt in with ``rank`` (the paper: 256
    for LLaMA-1B-7B, a quarter of GaLore's usual); groups without it and 1-D parameters get
    plain AdamW.  Every argument is keyword-only.

    Parameters
    ----------
    {params}
    {adam}
        ``formula="torch"`` (default) is the paper's ``M_hat / (sqrt(V_hat) + eps)`` with
        decay from the previous weights (eps 1e-8, no weight decay by default); ``"galore"``
        is galore-torch's placement of eps.
    {apollo}
    update_proj_gap, scale, proj_type, proj_seed
        Steps between random draws (default 200), the factor on the update (the paper's
        ``alpha``: 1.0; APOLLO-Mini sqrt(128)), the projected side (``"std"``: the smaller
        dimension, so channels are the larger one) and the seed the draws derive from (see
        :class:`~lowrank_optim.projectors.RandomProjector`).  Group keys win over these
        defaults.
    {lowbit}
    {nonfinite}

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=256, update_proj_gap=200, scale=1.0)
    >>> opt = ApolloAdamW(groups, lr=1e-2)
    """

    #: default ``scale`` of the class (the paper's ``alpha``)
    default_scale = 1.0


@fill_doc
class ApolloMini(compose(Apollo, RandomProjector, name="ApolloMini", scale_type="tensor",
                         scale=APOLLO_MINI_SCALE)):
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

    default_scale = APOLLO_MINI_SCALE
