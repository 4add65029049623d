"""GaLore optimizers: drop-ins for ``galore_torch.GaLoreAdamW`` and ``GaLoreAdafactor``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.projectors.svd import SVDProjector
from lowrank_optim.rules.adafactor import Adafactor
from lowrank_optim.rules.adam import Adam


class GaLoreAdamW(LowRankOptimizer):
    """AdamW with GaLore gradient projection (Zhao et al., 2024, arXiv:2403.03507).

    Same signature, group keys and defaults as ``galore_torch.GaLoreAdamW``: groups opt in with
    ``rank``; ``update_proj_gap`` (default 200), ``scale`` (default 1.0; the paper uses 0.25)
    and ``proj_type`` (``std``, ``reverse_std``, ``left``, ``right``, ``full``) complete them.
    Swapping the import reproduces galore-torch's training to fp32 rounding.

    Parameters
    ----------
    params
        Parameters or param groups.
    lr, betas, eps, weight_decay, correct_bias
        Adam hyper-parameters with galore-torch's defaults (eps 1e-6, no weight decay).
    formula
        ``"galore"`` (default): galore-torch's formula (eps added before bias correction,
        weight decay after the update).  ``"torch"``: ``torch.optim.AdamW``'s formula, e.g.
        ``GaLoreAdamW(params, formula="torch", eps=1e-8, weight_decay=1e-2)`` equals
        ``torch.optim.AdamW`` on groups without ``rank``.
    nonfinite
        ``"raise"`` | ``"skip"`` | ``"ignore"``: see :class:`LowRankOptimizer`.

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    >>> opt = GaLoreAdamW(groups, lr=1e-2)
    """

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
        nonfinite: str = "raise",
        no_deprecation_warning: bool = True,  # accepted for galore-torch compatibility
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, formula=formula)
        super().__init__(params, defaults, Adam(), SVDProjector(), nonfinite=nonfinite)


class GaLoreAdafactor(LowRankOptimizer):
    """Adafactor with GaLore gradient projection; drop-in for ``galore_torch.GaLoreAdafactor``.

    Hyper-parameters and defaults are those of ``transformers.Adafactor`` (relative step when
    ``lr`` is ``None``); the factored second moment is kept for the low-rank gradient.
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
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold,
                        decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
                        scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__(params, defaults, Adafactor(), SVDProjector(), nonfinite=nonfinite)
