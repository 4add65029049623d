"""``LowRankOptimizer``: the ``torch.optim.Optimizer`` subclass every optimizer builds on."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lowrank_optim.core import lowrank_step
from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Rule
from lowrank_optim.validation import (
    check_choice,
    check_grad,
    check_int_at_least,
    check_param,
    check_positive,
    param_label,
)

NONFINITE_MODES = ("raise", "skip", "ignore")

#: Group keys of the projection (galore-torch names); a group opts in with ``rank``.
PROJECTION_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
}


class LowRankOptimizer(torch.optim.Optimizer):
    """An inner :class:`Rule` composed with a :class:`Projector` for groups that set ``rank``.

    Parameters
    ----------
    params
        Parameters or param groups, as for any ``torch.optim.Optimizer``.  Groups with a
        ``rank`` project their 2-D parameters; 1-D parameters in such groups, and groups
        without ``rank``, get the same rule unprojected.
    defaults
        Default hyper-parameters (rule keys plus projection keys).
    rule, projector
        The inner rule and the subspace source.
    nonfinite
        What a NaN/Inf gradient does: ``"raise"`` (default) raises ``RuntimeError`` naming the
        parameter *before* anything is updated, so parameters and state stay as they were;
        ``"skip"`` warns and skips the whole step (like AMP's ``GradScaler``); ``"ignore"``
        skips the check (saves one pass over the gradients and a host sync).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        defaults: dict[str, Any],
        rule: Rule,
        projector: Projector,
        nonfinite: str = "raise",
    ) -> None:
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        self.rule = rule
        self.projector = projector
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        super().__init__(params, {**PROJECTION_DEFAULTS, **defaults})

    # -- construction ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self.rule.validate(group)
        if group["rank"] is not None:
            if group["update_proj_gap"] is not None:
                check_int_at_least("update_proj_gap", group["update_proj_gap"], 1)
            check_positive("scale", group["scale"])
        for i, p in enumerate(group["params"]):
            label = param_label(group, i, p)
            check_param(p, label)
            if group["rank"] is not None and p.dim() >= 2:  # 1-D tensors go unprojected
                self.projector.validate(p, group, label)  # rejects 3-D+ with a clear message

    @staticmethod
    def _projects(group: dict, param: torch.Tensor) -> bool:
        return group["rank"] is not None and param.dim() == 2

    # -- stepping -------------------------------------------------------------------------
    def _grads_finite(self) -> bool:
        """Check every gradient before touching any state; one host sync for all of them."""
        grads = [
            (g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])
            if p.grad is not None
        ]
        if not grads:
            return True
        for group, i, p in grads:
            check_grad(p.grad, param_label(group, i, p))
        # A sum is non-finite iff some element is NaN/Inf (barring fp32 overflow of the sum,
        # i.e. gradients near 1e38 / numel, which are broken anyway); it reads each gradient
        # once and writes nothing, about 3x cheaper than isfinite().all().
        # One host sync per device, not per parameter.
        sums = [p.grad.sum(dtype=torch.float32) for _, _, p in grads]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for s in sums:
            by_device.setdefault(s.device, []).append(s)
        if all(bool(torch.stack(v).isfinite().all()) for v in by_device.values()):
            return True
        group, i, p = next(g for g, s in zip(grads, sums, strict=True) if not s.isfinite())
        message = (f"non-finite (NaN/Inf) gradient in {param_label(group, i, p)}; no parameter "
                   "or optimizer state was changed.")
        if self.nonfinite == "raise":
            raise RuntimeError(message + " Lower the learning rate, enable gradient clipping, "
                               "or pass nonfinite='skip' to skip such steps.")
        warnings.warn(f"Skipping optimizer step: {message}", RuntimeWarning, stacklevel=3)
        self.skipped_steps += 1
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "ignore" and not self._grads_finite():
            return loss
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    self.step_param(p, group, i)
        return loss

    def step_param(self, param: torch.Tensor, group: dict, index: int = 0) -> None:
        """Step one parameter (used by :meth:`step` and by layer-wise updates)."""
        grad = param.grad
        check_grad(grad, lambda: param_label(group, index, param))
        projector = self.projector if self._projects(group, param) else None
        lowrank_step(param, grad, self.state[param], group, self.rule, projector)

    # -- public API for schedules and callbacks --------------------------------------------
    def request_refresh(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Recompute the subspace of ``params`` (default: every projected one) at its next step."""
        wanted = None if params is None else {id(p) for p in params}
        for group in self.param_groups:
            for p in group["params"]:
                if self._projects(group, p) and (wanted is None or id(p) in wanted):
                    self.state[p]["refresh_requested"] = torch.tensor(True)

    def projected_params(self) -> list[tuple[str, torch.Tensor, dict]]:
        """``(name, param, group)`` for every parameter this optimizer projects."""
        out = []
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if self._projects(group, p):
                    out.append((names[i] if names else f"param{i}", p, group))
        return out

    # -- state_dict -----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as saved: only the device follows the parameter.

        ``torch.optim.Optimizer`` casts every floating state tensor to its parameter's dtype
        (and integer indices would become floats); our state keeps its own dtypes, so after
        the regular load each tensor is put back with its saved dtype and resume is bit-exact.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device)
