"""GaLore optimizers: drop-ins for ``galore_torch.GaLoreAdamW``, ``GaLoreAdamW8bit`` and
``GaLoreAdafactor``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowrank_optim.optim._hyperparameters import fill_doc, group_defaults
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.projectors.svd import SVDProjector
from lowrank_optim.rules.adafactor import Adafactor
from lowrank_optim.rules.adam import Adam


@fill_doc
class GaLoreAdamW(LowRankOptimizer):
    """AdamW with GaLore gradient projection (Zhao et al., 2024, arXiv:2403.03507).

    Same signature, group keys and defaults as ``galore_torch.GaLoreAdamW``: groups opt in with
    ``rank``; ``update_proj_gap`` (default 200), ``scale`` (default 1.0; the paper uses 0.25)
    and ``proj_type`` (``std``, ``reverse_std``, ``left``, ``right``, ``full``) complete them.
    Swapping the import reproduces galore-torch's training to fp32 rounding.

    Parameters
    ----------
    {params}
    {adam}
        The defaults are galore-torch's (eps 1e-6, no weight decay).
    formula
        ``"galore"`` (default): galore-torch's formula (eps added before bias correction,
        weight decay after the update).  ``"torch"``: ``torch.optim.AdamW``'s formula, e.g.
        ``GaLoreAdamW(params, formula="torch", eps=1e-8, weight_decay=1e-2)`` equals
        ``torch.optim.AdamW`` on groups without ``rank``.
    {lowbit}
    {svd}
    {projection}
    {nonfinite}

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    >>> opt = GaLoreAdamW(groups, lr=1e-2)
    >>> opt8 = GaLoreAdamW(groups, lr=1e-2, bits=8)  # 8-bit moments
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
        rank: int | None = None,
        update_proj_gap: int | None = 200,
        scale: float = 1.0,
        proj_type: str = "std",
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
        no_deprecation_warning: bool = True,  # accepted for galore-torch compatibility
    ) -> None:
        defaults = group_defaults(locals(), Adam, self.projector_type)
        super().__init__(params, defaults, Adam(), self.projector_type(), nonfinite=nonfinite)


@fill_doc
class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore with 8-bit AdamW state; drop-in for ``galore_torch.GaLoreAdamW8bit``.

    Same signature and defaults as galore-torch's class (bitsandbytes' ``AdamW8bit``):
    ``torch.optim.AdamW``'s formula (``formula="torch"``: eps after the bias correction,
    decoupled decay), eps 1e-8, weight decay 1e-2, block-wise 8-bit moments for tensors of at
    least ``min_8bit_size`` elements (for projected weights: their low-rank moments).  Unlike
    galore-torch it needs no GPU-only package: the 8-bit step is
    :func:`lowrank_optim.kernels.adam_update_8bit` (Triton on CUDA, torch elsewhere), and the
    state is tensors only (resumable with ``torch.load(weights_only=True)``).

    Parameters
    ----------
    {params}
    lr, betas, eps, weight_decay
        AdamW hyper-parameters.
    amsgrad, percentile_clipping, block_wise, is_paged, args
        bitsandbytes options, accepted at their defaults only (``False``, 100, ``True``,
        ``False``, ``None``); other values raise ``ValueError`` (not supported).
    optim_bits
        Accepted and ignored, as by galore-torch's class (its state is always 8-bit); use
        :class:`GaLoreAdamW` for 32-bit state.
    bits
        Accepted for the registry's uniform ``bits=8``; any other value raises.
    min_8bit_size
        Tensors with fewer elements keep 32-bit moments (bitsandbytes' rule).
    block_size, code
        Elements per absmax scale (256, as bitsandbytes' block-wise mode) and the table
        (``"dynamic"`` or ``"linear"``).
    {svd}
    {projection}
    {nonfinite}

    Notes
    -----
    For projected weights galore-torch applies the decoupled weight decay after the
    back-projected update, bitsandbytes (unprojected parameters) before it; here it is applied
    before the update for both (``torch.optim.AdamW``'s order).  The two orders differ by
    ``lr * weight_decay`` times the update, a second-order difference.  The 8-bit tables are
    this library's (:mod:`lowrank_optim.kernels.blockwise`), not bitsandbytes' bit for bit.

    Examples
    --------
    >>> groups = lowrank_optim.param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    >>> opt = GaLoreAdamW8bit(groups, lr=1e-2)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: object = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int | None = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        bits: int = 8,
        block_size: int = 256,
        code: str = "dynamic",
        svd_method: str = "exact",
        svd_oversample: int = 10,
        svd_power_iters: int | None = None,
        svd_seed: int = 0,
        proj_bits: int = 32,
        proj_block_size: int = 256,
        nonfinite: str = "raise",
    ) -> None:
        if isinstance(bits, bool) or bits != 8:
            raise ValueError(f"GaLoreAdamW8bit keeps 8-bit moments: bits={bits!r} is not "
                             "supported; use GaLoreAdamW(..., bits=32) for 32-bit state.")
        unsupported = [
            (amsgrad, False, "amsgrad", "AMSGrad's max-of-V state is not implemented"),
            (percentile_clipping, 100, "percentile_clipping",
             "clip gradients before step() instead, e.g. torch.nn.utils.clip_grad_norm_"),
            (block_wise, True, "block_wise", "only block-wise quantisation is implemented"),
            (is_paged, False, "is_paged", "paged (CPU-offloaded) state is a bitsandbytes "
             "CUDA feature"),
            (args, None, "args", "bitsandbytes' per-parameter config object is not used; pass "
             "settings as arguments or param-group keys"),
        ]
        for value, default, name, hint in unsupported:
            if value != default:
                raise ValueError(f"GaLoreAdamW8bit does not support {name}={value!r} (only "
                                 f"{default!r}): {hint}.")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         formula="torch", rank=rank, update_proj_gap=update_proj_gap,
                         scale=scale, proj_type=proj_type, bits=8, block_size=block_size, code=code,
                         min_8bit_size=min_8bit_size, svd_method=svd_method,
                         svd_oversample=svd_oversample, svd_power_iters=svd_power_iters,
                         svd_seed=svd_seed, proj_bits=proj_bits,
                         proj_block_size=proj_block_size, nonfinite=nonfinite)


@fill_doc
class GaLoreAdafactor(LowRankOptimizer):
    """Adafactor with GaLore gradient projection; drop-in for ``galore_torch.GaLoreAdafactor``.

    Groups opt in with ``rank`` and take ``update_proj_gap``, ``scale`` and ``proj_type`` as
    for :class:`GaLoreAdamW`.

    Parameters
    ----------
    {params}
    {adafactor}
    {svd}
    {projection}
    {nonfinite}
    """

    projector_type = SVDProjector

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
        update_proj_gap: int | None = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        svd_method: str = "exact",
        svd_oversample: int = 10,
        svd_power_iters: int | None = None,
        svd_seed: int = 0,
        proj_bits: int = 32,
        proj_block_size: int = 256,
        nonfinite: str = "raise",
    ) -> None:
        defaults = group_defaults(locals(), Adafactor, self.projector_type)
        super().__init__(params, defaults, Adafactor(), self.projector_type(),
                         nonfinite=nonfinite)
