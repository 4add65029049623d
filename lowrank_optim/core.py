"""The one low-rank step, shared by every optimizer of the library.

``lowrank_step`` reads straight through: refresh the subspace if due -> project the gradient ->
inner rule on the low-rank tensor -> back-project fused with the parameter update (+ scale)
-> decoupled weight decay.  Parameters without a projector take the same path with identity
projection, so a group without ``rank`` is plain AdamW / Adafactor with the same formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Projection, Rule, Update


def refresh_due(projector: Projector, state: dict, group: dict, step: int) -> bool:
    """Whether the subspace must be recomputed before this step.

    True when there is no subspace yet, when a refresh was requested through
    :meth:`LowRankOptimizer.request_refresh`, or every ``update_proj_gap`` steps counted from the
    first (GaLore's ``step % T == 0`` on the pre-increment step).  ``update_proj_gap=None``
    leaves the timing entirely to ``request_refresh`` (e.g. a Trainer callback).
    """
    if not projector.has_subspace(state):
        return True
    if state.pop("refresh_requested", None) is not None:
        return True
    gap = group.get("update_proj_gap")
    return bool(gap) and step % gap == 0


#: ``refresher(projector, grad, state, group, rule)``: how a due refresh is computed
Refresher = Callable[[Projector, torch.Tensor, dict, dict, Rule], "torch.Tensor | None"]


def local_refresh(projector: Projector, grad: torch.Tensor, state: dict, group: dict,
                  rule: Rule) -> torch.Tensor | None:
    """The default :data:`Refresher`: the projector refreshes from ``grad`` on this process
    (:func:`lowrank_optim.distributed.broadcast_refreshes` swaps in one that computes it on
    one rank and sends it to the others)."""
    return projector.refresh(grad, state, group, rule)


#: parameter dtypes whose step runs in fp32 (gradient, subspace, moments, update), rounded
#: into the parameter once at the end: fp16's range flushes squared gradients (about 1e-6 and
#: below) to zero, and then ``M / (sqrt(V) + eps)`` explodes.  bf16 has fp32's range and keeps
#: its moments in bf16 (galore-torch's behaviour, half the state memory).
FP32_STEP_DTYPES = (torch.float16,)


def lowrank_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    group: dict,
    rule: Rule,
    projector: Projector | None = None,
    *,
    projected: bool = False,
    refresher: Refresher = local_refresh,
) -> None:
    """Apply one optimizer step to ``param`` in place (called under ``torch.no_grad``).

    ``projected=True``: ``grad`` is already the low-rank gradient in the current subspace
    (layer-wise gradient accumulation sums projected micro-batch gradients), so neither a
    refresh nor a projection happens; a pending refresh request stays for the next step.
    ``refresher`` computes a due refresh (:data:`Refresher`).  Parameters in
    :data:`FP32_STEP_DTYPES` step an fp32 copy, written back once.
    """
    if param.dtype in FP32_STEP_DTYPES:
        work = param.float()
        _step(work, grad.float(), state, group, rule, projector, projected, refresher)
        param.copy_(work)
        return
    _step(param, grad, state, group, rule, projector, projected, refresher)


def _step_count(state: dict) -> torch.Tensor:
    """``state["step"]``, created as ``torch.tensor(0.0)`` (torch's float step count) if
    absent: the one place the core starts a parameter's count."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
    return state["step"]


def _step(
    param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, rule: Rule,
    projector: Projector | None, projected: bool, refresher: Refresher,
) -> None:
    step = int(_step_count(state))

    low = grad
    if projector is not None and not projected:
        fresh = None
        if refresh_due(projector, state, group, step):
            fresh = refresher(projector, grad, state, group, rule)
            state["refresh_step"] = torch.tensor(step, dtype=torch.int64)
        low = projector.project(grad, state, group) if fresh is None else fresh

    state["step"] += 1
    if projector is None:
        rule.step_unprojected([param], [grad], [state], group)
        return
    projection = None
    if rule.full_gradient:
        if projected:
            raise ValueError(
                f"inner rule {rule.name!r} needs the full-size gradient of every step, but got "
                "a pre-projected (layer-wise accumulated) one; accumulate full gradients.")
        projection = Projection(grad, rank_axis(projector, grad, group),
                                lambda t: projector.project_back(t, state, group))
    update = rule.step(low, state, group, param, projection)
    apply(param, update, projector, state, group)


def rank_axis(projector: Projector, grad: torch.Tensor, group: dict) -> int:
    """The axis of ``grad`` the projector reduces to the rank (:attr:`Projection.axis`)."""
    sides = projector.sides(tuple(grad.shape), group)
    if len(sides) != 1:
        raise ValueError(f"proj_type={group.get('proj_type')!r} projects both sides; a rule "
                         "that scales channels of the full gradient needs one side: use "
                         "proj_type='std'.")
    return 0 if sides[0] == "left" else 1


def apply(param: torch.Tensor, update: Update, projector: Projector, state: dict,
          group: dict) -> None:
    """Apply a projected parameter's :class:`~lowrank_optim.rules.Update` in place: the
    decoupled decay around everything, the full-size term (if any), then the low-rank one,
    back-projected fused with the update where the backend allows."""
    before, after = update.decays
    scale = group["scale"]
    if update.full is not None:
        if before:
            param.mul_(1.0 - before)
        before = 0.0
        alpha = update.full_alpha * scale
        if update.full_scale is None:
            param.add_(update.full.to(param.dtype), alpha=alpha)
        else:
            param.addcmul_(update.full.to(param.dtype), update.full_scale.to(param.dtype),
                           value=alpha)
    if update.direction is None:
        if after:
            param.mul_(1.0 - after)
        return
    # decay and update in one pass where the backend fuses them (kernels.decoupled_decay order)
    projector.apply_update(param, update.direction, update.alpha * scale, state, group,
                           before, after)


def plain_steps(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
                group: dict, rule: Rule) -> None:
    """:func:`lowrank_step` without a projector for several parameters of one group at once,
    so that a rule with a multi-tensor kernel (:meth:`Rule.step_unprojected`) runs it once
    for all of them; each parameter gets the bits it would get alone.  Parameters in
    :data:`FP32_STEP_DTYPES` must go through :func:`lowrank_step`."""
    for state in states:
        _step_count(state).add_(1)
    rule.step_unprojected(params, grads, states, group)
