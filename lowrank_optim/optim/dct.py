"""SVD-free low-rank optimizers: DCT-basis projection (Modoranu et al., 2025, arXiv:2505.17967)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.projectors.dct import DCTProjector
from lowrank_optim.rules.adafactor import Adafactor
from lowrank_optim.rules.adam import Adam
from lowrank_optim.validation import as_tuple


def _dct_defaults(
    update_proj_gap: int | None,
    scale: float,
    proj_type: str,
    score_norm: str,
    score_route: str,
    rotate_moments: bool,
    error_feedback: bool,
) -> dict[str, Any]:
    return dict(update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                score_norm=score_norm, score_route=score_route, rotate_moments=rotate_moments,
                error_feedback=error_feedback)


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
    params
        Parameters or param groups.  Group keys override the keyword defaults below.
    lr, betas, eps, weight_decay, correct_bias
        Adam hyper-parameters; ``eps=1e-8`` as in the reference implementation.
    formula
        ``"torch"`` (default): ``torch.optim.AdamW``'s formula, which is the reference DCT-AdamW
        update (eps after the bias correction, decoupled decay before the step).
        ``"galore"``: galore-torch's formula, for comparisons with :class:`GaLoreAdamW`.
    update_proj_gap
        Steps between subspace re-selections (default 1: every step; ``None`` leaves the timing
        to :meth:`request_refresh`).
    scale
        Factor on the back-projected update (default 1.0: the reference has none).
    proj_type
        Side rule: ``"std"`` (default; right side when ``rows >= cols``, else left: the smaller
        dimension is transformed), ``"reverse_std"``, ``"left"`` or ``"right"``.
    score_norm
        ``"l2"`` (default, optimal energy capture) or ``"l1"`` (the reference's default).
    score_route
        ``"auto"`` (default), ``"matmul"`` or ``"fft"``.
    rotate_moments
        Re-express the moments in the new subspace on each refresh (default ``True``; the
        reference's default is ``False``, which scrambles the moments when the selection
        changes: see :class:`~lowrank_optim.projectors.dct.DCTProjector`).
    error_feedback
        Feed the projection residual back into the next gradient (full-size buffer per layer;
        default ``False``).
    bits, block_size, code, min_8bit_size
        Optimizer-state precision: ``bits=8`` keeps the moments as block-wise 8-bit codes
        (see :class:`lowrank_optim.rules.Adam`); default ``bits=32``.
    nonfinite
        ``"raise"`` | ``"skip"`` | ``"ignore"``: see :class:`LowRankOptimizer`.

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=128, update_proj_gap=1, scale=1.0)
    >>> opt = DCTAdamW(groups, lr=1e-3, weight_decay=0.1)

    ``param_groups`` writes its own ``update_proj_gap`` / ``scale`` (GaLore's 200 / 0.25 unless
    given) into the projected group, where they take precedence over this class's defaults;
    ``lowrank_optim.create_optimizer(model, "dct_adamw")`` uses the DCT defaults.
    """

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
        update_proj_gap: int | None = 1,
        scale: float = 1.0,
        proj_type: str = "std",
        score_norm: str = "l2",
        score_route: str = "auto",
        rotate_moments: bool = True,
        error_feedback: bool = False,
        bits: int = 32,
        block_size: int = 256,
        code: str = "dynamic",
        min_8bit_size: int = 4096,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(lr=lr, betas=as_tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, formula=formula, bits=bits,
                        block_size=block_size, code=code, min_8bit_size=min_8bit_size,
                        **_dct_defaults(update_proj_gap, scale, proj_type, score_norm,
                                        score_route, rotate_moments, error_feedback))
        super().__init__(params, defaults, Adam(), DCTProjector(), nonfinite=nonfinite)


class DCTAdafactor(LowRankOptimizer):
    """Adafactor in a DCT low-rank subspace: :class:`DCTAdamW`'s projection with the rule of
    :class:`~lowrank_optim.optim.galore.GaLoreAdafactor`.

    Adafactor hyper-parameters and defaults are those of ``transformers.Adafactor`` (relative
    step when ``lr`` is ``None``); the factored second moment is kept for the low-rank
    gradient.  Projection keywords as in :class:`DCTAdamW`; with ``rotate_moments`` the
    factored statistic along the rank axis is rotated (permuted) with the first moment.
    """

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
        update_proj_gap: int | None = 1,
        scale: float = 1.0,
        proj_type: str = "std",
        score_norm: str = "l2",
        score_route: str = "auto",
        rotate_moments: bool = True,
        error_feedback: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(lr=lr, eps=as_tuple(eps), clip_threshold=clip_threshold,
                        decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
                        scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init,
                        **_dct_defaults(update_proj_gap, scale, proj_type, score_norm,
                                        score_route, rotate_moments, error_feedback))
        super().__init__(params, defaults, Adafactor(), DCTProjector(), nonfinite=nonfinite)
