"""Adam with decoupled weight decay, in galore-torch's or torch.optim.AdamW's formula."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lowrank_optim import kernels, quantization
from lowrank_optim.rules.base import Rule, Update
from lowrank_optim.validation import check_betas, check_choice, check_lr, check_nonneg

FORMULAS = ("galore", "torch")
#: the two moments and whether each uses the signed quantisation table
MOMENTS = {name: quantization.is_signed(name) for name in ("exp_avg", "exp_avg_sq")}


class Adam(Rule):
    """Adam moments on the (projected) gradient, in 32-bit or block-wise 8-bit state.

    ``formula="galore"`` (default) reproduces galore-torch / the old ``transformers.AdamW``:
    ``N = M / (sqrt(V) + eps)``, step size ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (bias
    correction optional with ``correct_bias``) and weight decay ``W -= lr * wd * W`` *after* the
    update.  ``formula="torch"`` reproduces ``torch.optim.AdamW``: ``eps`` is added after the
    second-moment bias correction (so it acts smaller early on) and the decay is applied first.
    The moment update and the direction are :func:`lowrank_optim.kernels.adam_update` (one
    fused kernel on CUDA).

    Low-bit state, from the group keys of :data:`lowrank_optim.quantization.DEFAULTS`:
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
    structure_keys = {key: quantization.DEFAULTS[key] for key in ("bits", "block_size", "code")}

    def validate(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_choice("formula", group["formula"], FORMULAS)
        if not isinstance(group["correct_bias"], bool):
            raise ValueError(f"Invalid correct_bias={group['correct_bias']!r}: pass True or "
                             "False.")
        quantization.check_settings(group)

    @staticmethod
    def init_state(low: torch.Tensor, state: dict, group: dict) -> None:
        """Zero moments for a gradient like ``low``: 8-bit when ``group`` asks for it and
        ``low`` has at least ``min_8bit_size`` elements, else in ``low``'s dtype."""
        if not quantization.use_8bit(group, low.numel()):
            for name in MOMENTS:
                state[name] = torch.zeros_like(low, memory_format=torch.contiguous_format)
            return
        _, block_size, code, _ = quantization.settings(group)
        for name, signed in MOMENTS.items():
            codes, absmax = quantization.zeros(low.shape, low.device, block_size, code, signed)
            state[name + quantization.CODES_SUFFIX] = codes
            state[name + quantization.ABSMAX_SUFFIX] = absmax

    def update(self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor) -> Update:
        if "exp_avg" not in state and "exp_avg_codes" not in state:
            self.init_state(low, state, group)
        beta1, beta2 = group["betas"]
        lr, eps, step = group["lr"], group["eps"], float(state["step"])
        bias1 = 1.0 - beta1**step
        bias2 = 1.0 - beta2**step
        formula = group["formula"]
        if "exp_avg" in state:
            direction = kernels.adam_update(
                low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, eps, formula, bias2)
        else:
            direction = self._update_8bit(low, state, group, beta1, beta2, eps, formula, bias2)

        if formula == "torch":
            return Update(direction, -lr / bias1,
                          decay=lr * group["weight_decay"], decay_first=True)
        step_size = lr * math.sqrt(bias2) / bias1 if group["correct_bias"] else lr
        return Update(direction, -step_size, decay=lr * group["weight_decay"], decay_first=False)

    def check_state(self, state: dict, group: dict, label: str | Callable[[], str]) -> None:
        """8-bit moments must have one absmax per ``block_size`` elements."""
        if "exp_avg_codes" not in state:
            return
        _, block_size, _, _ = quantization.settings(group)
        absmax, numel = state["exp_avg_absmax"], state["exp_avg_codes"].numel()
        if absmax.numel() != quantization.num_blocks(numel, block_size):
            label = label() if callable(label) else label
            raise ValueError(
                f"{label}: 8-bit Adam state has {absmax.numel()} blocks for {numel} elements, "
                f"which does not match block_size={block_size}: the state was created with "
                "another block_size; keep the block_size it was saved with.")

    @staticmethod
    def _update_8bit(low: torch.Tensor, state: dict, group: dict, beta1: float, beta2: float,
                     eps: float, formula: str, bias2: float) -> torch.Tensor:
        _, block_size, code, _ = quantization.settings(group)
        absmax = state["exp_avg_absmax"]
        return kernels.adam_update_8bit(
            low, state["exp_avg_codes"], absmax, state["exp_avg_sq_codes"],
            state["exp_avg_sq_absmax"], beta1, beta2, eps, formula, bias2, block_size, code)
