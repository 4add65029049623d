"""Adam with decoupled weight decay, in galore-torch's or torch.optim.AdamW's formula."""

from __future__ import annotations

import math

import torch

from lowrank_optim import kernels
from lowrank_optim.rules.base import Rule, Update
from lowrank_optim.validation import check_betas, check_choice, check_lr, check_nonneg

FORMULAS = ("galore", "torch")


class Adam(Rule):
    """Adam moments on the (projected) gradient.

    ``formula="galore"`` (default) reproduces galore-torch / the old ``transformers.AdamW``:
    ``N = M / (sqrt(V) + eps)``, step size ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (bias
    correction optional with ``correct_bias``) and weight decay ``W -= lr * wd * W`` *after* the
    update.  ``formula="torch"`` reproduces ``torch.optim.AdamW``: ``eps`` is added after the
    second-moment bias correction (so it acts smaller early on) and the decay is applied first.
    The moment update and the direction are :func:`lowrank_optim.kernels.adam_update` (one
    fused kernel on CUDA).
    """

    name = "adam"

    def validate(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_choice("formula", group["formula"], FORMULAS)

    def update(self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor) -> Update:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(low, memory_format=torch.contiguous_format)
        beta1, beta2 = group["betas"]
        lr, eps, step = group["lr"], group["eps"], float(state["step"])
        bias1 = 1.0 - beta1**step
        bias2 = 1.0 - beta2**step
        formula = group["formula"]
        direction = kernels.adam_update(
            low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, eps, formula, bias2)

        if formula == "torch":
            return Update(direction, -lr / bias1,
                          decay=lr * group["weight_decay"], decay_first=True)
        step_size = lr * math.sqrt(bias2) / bias1 if group["correct_bias"] else lr
        return Update(direction, -step_size, decay=lr * group["weight_decay"], decay_first=False)
