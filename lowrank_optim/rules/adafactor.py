"""Adafactor (Shazeer & Stern, 2018) as in ``transformers.Adafactor`` / galore-torch."""

from __future__ import annotations

import math

import torch

from lowrank_optim.rules.base import Moment, Rule, Update
from lowrank_optim.validation import (
    as_real,
    check_beta,
    check_lr,
    check_nonneg,
    check_pair,
    check_positive,
)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


class Adafactor(Rule):
    """Factored second moment (row and column means) for 2-D inputs, full for 1-D.

    With a projector the factored statistics are those of the *low-rank* gradient, so the
    second moment costs ``m + r`` floats instead of ``m + n``.  Computation runs in fp32 for
    half-precision gradients.  Keys as in ``transformers.Adafactor``: ``lr`` (``None`` with
    ``relative_step``), ``eps=(eps1, eps2)``, ``clip_threshold``, ``decay_rate``, ``beta1``,
    ``weight_decay``, ``scale_parameter``, ``relative_step``, ``warmup_init``.
    """

    name = "adafactor"
    moments = (
        Moment("exp_avg", float32=True, when=lambda grad, group: group["beta1"] is not None),
        Moment("exp_avg_sq_row", reduced=-1, signed=False, float32=True,
               when=lambda grad, group: grad.dim() >= 2),
        Moment("exp_avg_sq_col", reduced=-2, signed=False, float32=True,
               when=lambda grad, group: grad.dim() >= 2),
        Moment("exp_avg_sq", signed=False, float32=True, when=lambda grad, group: grad.dim() < 2),
    )
    lowbit_note = ("its second moment is already factored: one row and one column vector per "
                   "matrix")
    hyperparameters = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
                       "scale_parameter", "relative_step", "warmup_init")
    #: ``transformers.Adafactor``'s
    defaults = {"lr": None, "eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8,
                "beta1": None, "weight_decay": 0.0, "scale_parameter": True,
                "relative_step": True, "warmup_init": False}

    def validate(self, group: dict) -> None:
        lr = group["lr"]
        check_lr(lr, allow_none=True)
        if lr is not None and group["relative_step"]:
            raise ValueError("Cannot combine a manual lr with relative_step=True: pass "
                             "lr=None for Adafactor's relative step, or relative_step=False.")
        if lr is None and not group["relative_step"]:
            raise ValueError("lr=None needs relative_step=True; pass an lr or set relative_step.")
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("warmup_init=True requires relative_step=True.")
        eps = group["eps"]
        check_pair("eps", eps, 2, "(1e-30, 1e-3): Adafactor's eps is a pair (eps1, eps2)")
        check_nonneg("eps[0]", eps[0])
        check_nonneg("eps[1]", eps[1])
        check_positive("clip_threshold", group["clip_threshold"])
        if not as_real("decay_rate", group["decay_rate"]) < 0.0:
            raise ValueError(f"Invalid decay_rate={group['decay_rate']!r}: must be < 0 "
                             "(e.g. -0.8).")
        check_beta("beta1", group["beta1"])
        check_nonneg("weight_decay", group["weight_decay"])
        super().validate(group)

    @staticmethod
    def _lr(group: dict, step: float, param_rms: torch.Tensor | None) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            # meta tensors (analytic memory profiling) have no value: any scale will do
            rms = 1.0 if param_rms.device.type == "meta" else float(param_rms)
            lr = max(group["eps"][1], rms) * lr
        return lr

    def update(self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor) -> Update:
        grad = low.float() if low.dtype in (torch.float16, torch.bfloat16) else low
        factored = grad.dim() >= 2
        step = float(state["step"])
        param_rms = _rms(param.float()) if group["scale_parameter"] else None
        lr = self._lr(group, step, param_rms)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])

        update = grad.square() + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            sq = state["exp_avg_sq"]
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = sq.rsqrt().mul_(grad)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            update = exp_avg
        decay = lr * group["weight_decay"]
        return Update(update.to(low.dtype), -1.0, decay=decay, decay_first=True)
