"""``create_optimizer(model, name, ...)``: one call from a model to a configured optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_optim.groups import TargetModules, param_groups
from lowrank_optim.optim.galore import GaLoreAdafactor, GaLoreAdamW

#: name -> optimizer class taking param groups with projection keys
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "galore_adamw": GaLoreAdamW,
    "galore_adafactor": GaLoreAdafactor,
}
#: name -> baseline without projection (same call shape, for benchmarks and recipes)
BASELINES: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
}


def available() -> list[str]:
    """Names accepted by :func:`create_optimizer`."""
    return sorted({**OPTIMIZERS, **BASELINES})


def create_optimizer(
    model: nn.Module,
    name: str,
    *,
    target_modules: TargetModules = "all-linear",
    rank: int = 128,
    update_proj_gap: int | None = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``.

    Projection settings go to the group of targeted ``nn.Linear`` weights (see
    :func:`lowrank_optim.param_groups`); ``optimizer_kwargs`` (``lr``, ``betas``,
    ``weight_decay`` ...) go to the optimizer.  Baselines (``"adamw"``) ignore projection keys.

    Examples
    --------
    >>> opt = create_optimizer(model, "galore_adamw", lr=1e-2, rank=128, scale=0.25)
    >>> trainer = Trainer(model=model, args=args, optimizers=(opt, None), ...)
    """
    key = name.lower().replace("-", "_")
    if key in BASELINES:
        return BASELINES[key](
            [p for p in model.parameters() if p.requires_grad], **optimizer_kwargs
        )
    if key not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer name={name!r}; choose one of {available()}.")
    groups = param_groups(model, target_modules, rank=rank, update_proj_gap=update_proj_gap,
                          scale=scale, proj_type=proj_type)
    return OPTIMIZERS[key](groups, **optimizer_kwargs)
