"""Adam with decoupled weight decay, in galore-torch's or torch.optim.AdamW's formula."""

from __future__ import annotations

import math

import torch

from lowrank_optim import kernels
from lowrank_optim.kernels import multi_tensor
from lowrank_optim.rules import lowbit
from lowrank_optim.rules.base import Moment, Rule, Update
from lowrank_optim.validation import check_betas, check_choice, check_lr, check_nonneg

FORMULAS = ("galore", "torch")


class Adam(Rule):
    """Adam moments on the (projected) gradient, in 32-bit or block-wise 8-bit state.

    ``formula="galore"`` (default) reproduces galore-torch / the old ``transformers.AdamW``:
    ``N = M / (sqrt(V) + eps)``, step size ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` and weight
    decay ``W -= lr * wd * W`` *after* the update.  ``formula="torch"`` reproduces
    ``torch.optim.AdamW``: ``eps`` is added after the second-moment bias correction (so it acts
    smaller early on) and the decay is applied first.  ``correct_bias=False`` drops both bias
    corrections in either formula (step size ``lr``, ``N = M / (sqrt(V) + eps)``).
    The moment update and the direction are :func:`lowrank_optim.kernels.adam_update` (one
    fused kernel on CUDA).

    Low-bit state, from the group keys of :data:`lowrank_optim.rules.lowbit.DEFAULTS`:
    ``bits`` (32 default, or 8), ``block_size`` (256), ``code`` (``"dynamic"`` or
    ``"linear"``) and ``min_8bit_size`` (4096).  With ``bits=8`` each moment tensor of at
    least ``min_8bit_size`` elements (the *low-rank* moment for projected weights) is stored as
    ``exp_avg_codes`` / ``exp_avg_sq_codes`` (uint8, the moment's shape) plus
    ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (fp32, one per block): ``numel +
    4 * ceil(numel / block_size)`` bytes per moment instead of ``4 * numel``.  The first moment
    uses the signed table, the second the unsigned one.  Each step runs
    :func:`lowrank_optim.kernels.adam_update_8bit`: dequantise -> the same moment update ->
    direction from the fp32 moments -> requantise (fused in one pass per block on CUDA).
    Smaller tensors keep 32-bit moments ``exp_avg`` / ``exp_avg_sq``.  A parameter's state
    keeps the format it was created with (so a loaded state resumes as saved).  Keep
    ``code="dynamic"`` for training: the linear table flushes second-moment entries below
    ``absmax / 510`` of their block to zero, and ``M / (sqrt(V) + eps)`` then blows up (the
    tiny LLaMA of the tests diverges with it); it is there for comparisons.
    """

    name = "adam"
    moments = (Moment("exp_avg"), Moment("exp_avg_sq", signed=False))
    elementwise = True
    bits = (32, 8)
    fused_lowbit = True
    hyperparameters = ("lr", "betas", "eps", "weight_decay", "correct_bias", "formula",
                       *lowbit.DEFAULTS)
    #: ``torch.optim.AdamW``'s
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
                "correct_bias": True, "formula": "torch", **lowbit.DEFAULTS}

    def validate(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_choice("formula", group["formula"], FORMULAS)
        if not isinstance(group["correct_bias"], bool):
            raise ValueError(f"Invalid correct_bias={group['correct_bias']!r}: pass True or "
                             "False.")
        super().validate(group)

    @staticmethod
    def _bias_corrections(group: dict, state: dict) -> tuple[float, float]:
        """``(1 - b1^t, 1 - b2^t)``, or ``(1, 1)`` with ``correct_bias=False`` (no bias
        correction in either formula; torch's used to ignore it)."""
        if not group["correct_bias"]:
            return 1.0, 1.0
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        return 1.0 - beta1**step, 1.0 - beta2**step

    @classmethod
    def direction_scale(cls, group: dict, state: dict) -> float:
        """``c`` such that ``c * direction`` is the bias-corrected Adam output
        ``M_hat / (sqrt(V_hat) + eps')`` and the step is ``-lr * c * direction``: ``1 / (1 -
        b1^t)`` (torch formula) or ``sqrt(1 - b2^t) / (1 - b1^t)`` (galore formula, whose eps
        is then ``eps / sqrt(1 - b2^t)``).  APOLLO and Fira measure norms of that output."""
        bias1, bias2 = cls._bias_corrections(group, state)
        return 1.0 / bias1 if group["formula"] == "torch" else math.sqrt(bias2) / bias1

    def update(self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor) -> Update:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        _, bias2 = self._bias_corrections(group, state)
        formula = group["formula"]
        if "exp_avg" in state:
            direction = kernels.adam_update(
                low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, eps, formula, bias2)
        else:
            direction = self._update_8bit(low, state, group, beta1, beta2, eps, formula, bias2)
        bias1 = self._bias_corrections(group, state)[0]
        decay = lr * group["weight_decay"]
        if formula == "torch":
            return Update(direction, -lr / bias1, decay=decay, decay_first=True)
        return Update(direction, -(lr * math.sqrt(bias2) / bias1), decay=decay)

    def step_unprojected(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
        group: dict,
    ) -> None:
        """All 32-bit, bias-corrected CPU tensors in one fused multi-tensor pass
        (:func:`lowrank_optim.kernels.multi_tensor.adamw_`, grouped by dtype and, for the
        galore formula, by step); the rest (8-bit moments, ``correct_bias=False``, other
        devices) one at a time through the base class."""
        batches: dict[tuple, list[int]] = {}
        rest = []
        for i, (p, g, s) in enumerate(zip(params, grads, states, strict=True)):
            if not self.has_state(s):
                self.init_state(g, s, group)
            if group["correct_bias"] and multi_tensor.supports(
                    p, g, s.get("exp_avg"), s.get("exp_avg_sq"), s["step"]):
                key = (p.dtype, float(s["step"]) if group["formula"] == "galore" else None)
                batches.setdefault(key, []).append(i)
            else:
                rest.append(i)
        beta1, beta2 = group["betas"]
        for batch in batches.values():
            multi_tensor.adamw_(
                [params[i] for i in batch], [grads[i] for i in batch],
                [states[i]["exp_avg"] for i in batch], [states[i]["exp_avg_sq"] for i in batch],
                [states[i]["step"] for i in batch], lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], formula=group["formula"])
        if rest:
            super().step_unprojected([params[i] for i in rest], [grads[i] for i in rest],
                                     [states[i] for i in rest], group)

    def _update_8bit(self, low: torch.Tensor, state: dict, group: dict, beta1: float,
                     beta2: float, eps: float, formula: str, bias2: float) -> torch.Tensor:
        _, block_size, code, _ = lowbit.settings(group)
        first, second = self.moments
        m_codes, m_absmax = (state[k] for k in first.storage)
        v_codes, v_absmax = (state[k] for k in second.storage)
        return kernels.adam_update_8bit(low, m_codes, m_absmax, v_codes, v_absmax, beta1,
                                        beta2, eps, formula, bias2, block_size, code)
