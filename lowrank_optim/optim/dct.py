"""SVD-free low-rank optimizers: DCT-basis projection (Modoranu et al., 2025, arXiv:2505.17967)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowrank_optim.optim._hyperparameters import fill_doc, group_defaults
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.projectors.dct import DCTProjector
from lowrank_optim.rules.adafactor import Adafactor
from lowrank_optim.rules.adam import Adam


@fill_doc
class DCTAdamW(LowRankOptimizer):
    """AdamW in a low-rank subspace spanned by DCT-II basis vectors (no SVD).

    Each projected weight keeps only the indices of the ``rank`` DCT basis vectors best aligned
    with its gradient (re-selected every ``update_proj_gap`` steps, by default every step as in
    the reference), its two ``r x max(m, n)`` moments, and nothing else: one DCT basis per size
    is shared by all layers (see :class:`~lowrank_optim.projectors.dct.DCTProjector` for the
    orientation, scoring routes and options).  Groups opt in with ``rank``, like GaLore's;
    groups without it and 1-D parameters get plain AdamW (``lowrank_optim.param_groups``
    leaves embeddings, ``lm_head`` and norms unprojected).

    Parameters
    ----------
    {params}
    {adam}
        ``eps=1e-8`` as in the reference implementation.
    formula
        ``"torch"`` (default): ``torch.optim.AdamW``'s formula, which is the reference DCT-AdamW
        update (eps after the bias correction, decoupled decay before the step).
        ``"galore"``: galore-torch's formula, for comparisons with
        :class:`~lowrank_optim.GaLoreAdamW`.
    {dct}
    {lowbit}
    {nonfinite}

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=128, update_proj_gap=1, scale=1.0)
    >>> opt = DCTAdamW(groups, lr=1e-3, weight_decay=0.1)

    ``param_groups`` writes its own ``update_proj_gap`` / ``scale`` (GaLore's 200 / 0.25 unless
    given) into the projected group, where they take precedence over this class's defaults;
    ``lowrank_optim.create_optimizer(model, "dct_adamw")`` uses the DCT defaults.
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
        rank: int | None = None,
        update_proj_gap: int | None = 1,
        scale: float = 1.0,
        proj_type: str = "std",
        score_norm: str = "l2",
        score_route: str = "auto",
        rotate_moments: bool = True,
        error_feedback: bool = False,
        error_feedback_bits: int = 32,
        bits: int = 32,
        block_size: int = 256,
        code: str = "dynamic",
        min_8bit_size: int = 4096,
        nonfinite: str = "raise",
    ) -> None:
        defaults = group_defaults(locals(), Adam, self.projector_type)
        super().__init__(params, defaults, Adam(), self.projector_type(), nonfinite=nonfinite)


@fill_doc
class DCTAdafactor(LowRankOptimizer):
    """Adafactor in a DCT low-rank subspace: :class:`DCTAdamW`'s projection with the rule of
    :class:`~lowrank_optim.optim.galore.GaLoreAdafactor`.

    With ``rotate_moments`` the factored statistic along the rank axis is rotated (permuted)
    with the first moment.

    Parameters
    ----------
    {params}
    {adafactor}
    {dct}
    {nonfinite}
    """

    projector_type = DCTProjector

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int | None = 1,
        scale: float = 1.0,
        proj_type: str = "std",
        score_norm: str = "l2",
        score_route: str = "auto",
        rotate_moments: bool = True,
        error_feedback: bool = False,
        error_feedback_bits: int = 32,
        nonfinite: str = "raise",
    ) -> None:
        defaults = group_defaults(locals(), Adafactor, self.projector_type)
        super().__init__(params, defaults, Adafactor(), self.projector_type(),
                         nonfinite=nonfinite)
