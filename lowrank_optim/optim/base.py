"""``LowRankOptimizer``: the ``torch.optim.Optimizer`` subclass every optimizer builds on."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lowrank_optim import distributed
from lowrank_optim.core import (
    FP32_STEP_DTYPES,
    Refresher,
    local_refresh,
    lowrank_step,
    plain_steps,
)
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

    Attributes
    ----------
    projector_type
        The :class:`Projector` class this optimizer class uses; engines read its declared
        capabilities (``layerwise``, ``refresh_timing``, ``row_shardable``) from it.
    refresher
        How a due refresh is computed (:data:`lowrank_optim.core.Refresher`; replaced by
        :func:`lowrank_optim.distributed.broadcast_refreshes`).
    """

    projector_type: type[Projector] = Projector
    #: state keys the core itself keeps per parameter (memory category ``other``)
    CORE_STATE_KEYS = ("step", "refresh_step", "refresh_requested")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        defaults: dict[str, Any],
        rule: Rule,
        projector: Projector,
        nonfinite: str = "raise",
    ) -> None:
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        if isinstance(params, torch.nn.Module):
            raise TypeError(
                f"{type(self).__name__} got the model ({type(params).__name__}); pass its "
                "param groups, e.g. lowrank_optim.param_groups(model, rank=...), or build the "
                "optimizer with lowrank_optim.create_optimizer(model, name, ...).")
        self.rule = rule
        self.projector = projector
        self.refresher: Refresher = local_refresh
        self.nonfinite = nonfinite
        self._layouts: dict[int, tuple] = {}  # id(group) -> (layout fingerprint, refresher type)
        self.skipped_steps = 0
        self._track_overlap = False
        self._overlaps: dict[torch.Tensor, torch.Tensor] = {}
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
        # flattened groups (DeepSpeed ZeRO) and unsupported FSDP2 shards raise here, and again
        # in step() when the group changed: engines swap the tensors in param_groups later
        self._check_layout(group)

    def _check_layout(self, group: dict) -> None:
        """:func:`distributed.check_group_layout` when ``group``'s tensors or settings, or the
        refresher, changed since the last check (a step costs one fingerprint, not a
        re-check); the verdict depends on the refresher (FSDP2 refuses ``rotate_moments``
        with :func:`distributed.broadcast_refreshes`, installed after construction)."""
        refresher = type(self.refresher)
        if self._layouts.get(id(group)) != (distributed.layout_fingerprint(group), refresher):
            distributed.check_group_layout(self, group)
            # after the check, which records the group's matrix count in the group
            self._layouts[id(group)] = (distributed.layout_fingerprint(group), refresher)

    @staticmethod
    def projects(group: dict, param: torch.Tensor) -> bool:
        """Whether ``param`` of ``group`` is projected (a 2-D tensor in a group with ``rank``)."""
        return group["rank"] is not None and param.dim() == 2

    def state_categories(self) -> dict[str, str]:
        """Memory category of every state key this optimizer may create, from the rule's and
        projector's declarations (:func:`lowrank_optim.memory.state_bytes`); others are
        ``"other"``."""
        return {**dict.fromkeys(self.CORE_STATE_KEYS, "other"),
                **self.projector.state_categories(), **self.rule.state_categories()}

    # -- stepping -------------------------------------------------------------------------
    def _check_step_inputs(self) -> list[tuple[dict, int, torch.Tensor]]:
        """Validate every gradient and state before anything changes: ``(group, index, param)``
        of the parameters to step.  Layout, dtype, shape and device of each gradient
        (:func:`check_grad`) and the rule's view of each state (:meth:`Rule.check_state`)."""
        grads = [
            (g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])
            if p.grad is not None
        ]
        for group, i, p in grads:
            label = functools.partial(param_label, group, i, p)  # formatted on error only
            check_grad(p.grad, label, p)
            if p in self.state:
                self.rule.check_state(self.state[p], group, label)
        return grads

    def _grads_finite(self, grads: list[tuple[dict, int, torch.Tensor]]) -> bool:
        """Whether every gradient is finite; one host sync for all of them.  Meta tensors
        (analytic profiling) hold no values and count as finite."""
        grads = [(g, i, p) for g, i, p in grads if not p.grad.is_meta]
        if not grads:
            return True
        # A sum is non-finite iff some element is NaN/Inf (barring fp32 overflow of the sum,
        # i.e. gradients near 1e38 / numel, which are broken anyway); it reads each gradient
        # once and writes nothing, about 3x cheaper than isfinite().all().
        # One host sync per device, not per parameter.
        # FSDP2 gradients are checked shard by shard, and the verdict agreed across ranks.
        sums = [distributed.local_tensor(p.grad).sum(dtype=torch.float32) for _, _, p in grads]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for s in sums:
            by_device.setdefault(s.device, []).append(s)
        finite = all(bool(torch.stack(v).isfinite().all()) for v in by_device.values())
        if distributed.all_ranks_true(finite, (p for _, _, p in grads)):
            return True
        bad = next((g for g, s in zip(grads, sums, strict=True) if not s.isfinite()), None)
        where = param_label(*bad) if bad else "a gradient shard held by another rank"
        message = (f"non-finite (NaN/Inf) gradient in {where}; no parameter or optimizer state "
                   "was changed.")
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
        for group in self.param_groups:
            self._check_layout(group)
        grads = self._check_step_inputs()  # nothing changes before every input is checked
        if self.nonfinite != "ignore" and not self._grads_finite(grads):
            return loss
        by_group: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for group, i, p in grads:
            by_group.setdefault(id(group), []).append((i, p))
        for group in self.param_groups:
            todo = by_group.get(id(group), [])
            plain = [p for _, p in todo if self._steps_plain(group, p)]
            if plain:  # one multi-tensor call for the group's unprojected tensors
                plain_steps(plain, [p.grad for p in plain], [self.state[p] for p in plain],
                            group, self.rule)
            for i, p in todo:
                if not self._steps_plain(group, p):
                    self.step_param(p, group, i)
        return loss

    def _steps_plain(self, group: dict, param: torch.Tensor) -> bool:
        """Whether :meth:`step` steps ``param`` with its group's other unprojected tensors
        (:func:`lowrank_optim.core.plain_steps`) instead of through :meth:`step_param`: not
        projected, not an FSDP2 shard, not stepped in fp32 (``FP32_STEP_DTYPES``).  Its
        gradient was checked by :meth:`_check_step_inputs`."""
        return (not self.projects(group, param) and not distributed.is_dtensor(param)
                and param.dtype not in FP32_STEP_DTYPES)

    def _ordinal(self, group: dict, index: int) -> int:
        """Position of ``group["params"][index]`` among all of this optimizer's parameters
        (found by identity of the parameter, since a subclass may pass a modified copy of its
        group, as SST does with per-layer learning rates)."""
        param = group["params"][index]
        before = 0
        for g in self.param_groups:
            for i, p in enumerate(g["params"]):
                if p is param:
                    return before + i
            before += len(g["params"])
        return index

    def step_param(
        self,
        param: torch.Tensor,
        group: dict,
        index: int = 0,
        grad: torch.Tensor | None = None,
        *,
        projected: bool = False,
    ) -> None:
        """Step one parameter (used by :meth:`step` and by layer-wise updates).

        Parameters
        ----------
        param, group, index
            The parameter, its group and its index in ``group["params"]`` (for messages).
        grad
            Gradient to use instead of ``param.grad``.
        projected
            ``grad`` is already the low-rank gradient of ``param`` in its current subspace
            (layer-wise gradient accumulation, :mod:`lowrank_optim.layerwise`): no refresh
            and no projection happen in this step.
        """
        grad = param.grad if grad is None else grad
        check_grad(grad, lambda: param_label(group, index, param), None if projected else param)
        projector = self.projector if self.projects(group, param) else None
        state = self.state[param]
        if projector is not None and "step" not in state:
            projector.register(state, group, self._ordinal(group, index))
        if distributed.is_dtensor(param):  # FSDP2 shard: the same step on this rank's rows
            if projected:
                raise NotImplementedError(
                    f"{param_label(group, index, param)}: pre-projected (layer-wise) gradients "
                    "are not supported for FSDP2-sharded parameters.")
            distributed.sharded_step(param, grad, state, group, self.rule, projector,
                                     self.refresher)
            return
        if projector is None or projected or not getattr(self, "_track_overlap", False):
            lowrank_step(param, grad, state, group, self.rule, projector, projected=projected,
                         refresher=self.refresher)
            return
        # overlap tracking (off unless a callback asked): keep the old subspace's tensors
        # (refresh stores new ones) and compare once after a refresh, on the device
        before, step = projector.subspace(state), int(state.get("step", 0))
        lowrank_step(param, grad, state, group, self.rule, projector, refresher=self.refresher)
        if before and "refresh_step" in state and int(state["refresh_step"]) == step:
            value = projector.overlap(before, projector.subspace(state), group)
            if value is not None:
                self._overlaps[param] = value.detach()

    # -- public API for schedules and callbacks --------------------------------------------
    def request_refresh(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Recompute the subspace of ``params`` (default: every projected one) at its next step."""
        if isinstance(params, torch.Tensor):
            params = [params]
        wanted = None if params is None else {id(p) for p in params}
        for group in self.param_groups:
            for p in group["params"]:
                if self.projects(group, p) and (wanted is None or id(p) in wanted):
                    self.state[p]["refresh_requested"] = torch.tensor(True)

    def track_subspace_overlap(self, enabled: bool = True) -> None:
        """Record, at each refresh, the overlap between the old and the new subspace.

        Off by default (no cost).  When on, a refresh keeps references to the previous
        subspace's tensors for one comparison (:meth:`Projector.overlap`, a small matmul on
        the device); the latest value per parameter is reported by :meth:`subspace_stats`.
        """
        self._track_overlap = bool(enabled)
        if not enabled:
            self._overlaps.clear()

    @torch.no_grad()
    def subspace_stats(
        self, params: Iterable[torch.Tensor] | None = None, *, energy: bool = True
    ) -> list[dict[str, Any]]:
        """Diagnostics of the projected parameters (default: all), for schedules and callbacks.

        Parameters
        ----------
        params
            Restrict to these parameters (non-projected ones are ignored).
        energy
            Compute ``captured_energy`` from each parameter's current ``.grad`` (one
            projection and back-projection per parameter; call it while gradients exist,
            e.g. in a Trainer callback's ``on_pre_optimizer_step``).

        Returns
        -------
        list of dict
            One dict per parameter, in :meth:`projected_params` order, with keys ``name``,
            ``param`` (the tensor), ``step`` (optimizer steps taken), ``refresh_step`` (step
            index of the last refresh, ``None`` before any), ``steps_since_refresh`` (steps
            taken in the current subspace, 1 right after the step that refreshed it; ``None``
            before the first), ``captured_energy`` (``||P(G)||^2 / ||G||^2`` of ``param.grad``
            in the current subspace, see :meth:`Projector.captured_energy`; ``None`` without a
            gradient, a subspace or ``energy=True``) and ``overlap`` (between the last two
            subspaces, see :meth:`track_subspace_overlap`; ``None`` if not recorded).
            Values are Python numbers (one host transfer for all of them).
        """
        wanted = None if params is None else {id(p) for p in params}
        rows, pending = [], []
        overlaps = getattr(self, "_overlaps", {})
        for name, p, group in self.projected_params():
            if wanted is not None and id(p) not in wanted:
                continue
            state = self.state.get(p, {})
            has_subspace = bool(state) and self.projector.has_subspace(state)
            step = int(state["step"]) if "step" in state else 0
            refresh = int(state["refresh_step"]) if "refresh_step" in state else None
            row = {
                "name": name, "param": p, "step": step, "refresh_step": refresh,
                "steps_since_refresh": step - (refresh or 0) if has_subspace else None,
                "captured_energy": None, "overlap": None,
            }
            if energy and has_subspace and p.grad is not None:
                pending.append((row, "captured_energy",
                                self.projector.captured_energy(p.grad, state, group)))
            if p in overlaps:
                pending.append((row, "overlap", overlaps[p]))
            rows.append(row)
        by_device: dict[torch.device, list[tuple[dict, str, torch.Tensor]]] = {}
        for item in pending:
            by_device.setdefault(item[2].device, []).append(item)
        for items in by_device.values():
            values = torch.stack([t.float().reshape(()) for _, _, t in items]).tolist()
            for (row, key, _), value in zip(items, values, strict=True):
                row[key] = value
        return rows

    def projected_params(self) -> list[tuple[str, torch.Tensor, dict]]:
        """``(name, param, group)`` for every parameter this optimizer projects.

        Names come from the group's ``param_names`` (as :func:`lowrank_optim.param_groups`
        sets them); unnamed parameters are called ``group{g}.param{i}`` (unique across groups).
        """
        out = []
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if self.projects(group, p):
                    out.append((names[i] if names else f"group{g}.param{i}", p, group))
        return out

    # -- state_dict -----------------------------------------------------------------------
    #: top-level ``state_dict`` entry recording what defines the state's structure
    STRUCTURE_KEY = "lowrank_optim"
    #: ``load_state_dict``'s ``reproject`` default, for callers that pass only the state
    #: (the HF Trainer): set it on the optimizer to accept a state of another structure
    reproject_on_load: bool = False

    def structure(self) -> dict[str, Any]:
        """What a saved state must agree with to load: class, rule, projector and, per group,
        the rule's and projector's ``structure_keys`` (rank, proj_type, bits ...)."""
        return {
            "optimizer": type(self).__name__, "rule": self.rule.name,
            "projector": self.projector.name, "groups": self._group_structure(self.param_groups),
        }

    def _group_structure(self, groups: list[dict]) -> list[dict[str, Any]]:
        """The rule's and projector's ``structure_keys`` of each group, defaults filled in."""
        keys = {**self.projector.structure_keys, **self.rule.structure_keys}
        return [{k: g.get(k, d) for k, d in keys.items()} for g in groups]

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` plus a :meth:`structure` entry (strings and numbers only, so
        it still loads with ``torch.load(..., weights_only=True)``)."""
        sd = super().state_dict()
        sd[self.STRUCTURE_KEY] = self.structure()
        return sd

    def _structure_differences(self, state_dict: dict[str, Any],
                               mine: dict[str, Any]) -> list[str]:
        """Human-readable differences between ``state_dict``'s structure and ``mine``."""
        saved = state_dict.get(self.STRUCTURE_KEY)
        saved_groups = state_dict.get("param_groups", [])
        if saved is None:  # saved by another optimizer, or before structures were recorded
            if not saved_groups or any("rank" not in g for g in saved_groups):
                return ["the state was not saved by a lowrank_optim optimizer (its param groups "
                        "have no 'rank' key; e.g. torch.optim.AdamW's state)"]
            saved = {**mine, "groups": self._group_structure(saved_groups)}
        out = [f"{what}: saved {saved.get(what)!r}, this optimizer {mine[what]!r}"
               for what in ("optimizer", "rule", "projector") if saved.get(what) != mine[what]]
        if len(saved["groups"]) != len(mine["groups"]):
            return out + [f"param groups: saved {len(saved['groups'])}, this optimizer "
                          f"{len(mine['groups'])}"]
        for g, (old, new) in enumerate(zip(saved["groups"], mine["groups"], strict=True)):
            out += [f"group {g} {k}: saved {old.get(k)!r}, this optimizer {v!r}"
                    for k, v in new.items() if old.get(k, v) != v]
        return out

    def load_state_dict(self, state_dict: dict[str, Any], *, reproject: bool = False) -> None:
        """Load state as saved: only the device follows the parameter.

        A state saved with another structure (optimizer class, rule, projector, or a group's
        ``rank`` / ``proj_type`` / ``bits`` ..., see :meth:`structure`) is refused with a
        ``ValueError`` listing the differences, before anything changes.  ``reproject=True``
        (or the attribute ``reproject_on_load = True``, for callers such as the Trainer that
        call ``load_state_dict(sd)``) loads the hyper-parameters but keeps this optimizer's
        structure keys and drops the per-parameter state of the groups that differ; if the
        class, rule or projector differs nothing of the saved state applies and all state is
        dropped (the hyper-parameters stay this optimizer's).  Subspaces and moments then
        start afresh at the next step, and a warning lists the differences.

        ``torch.optim.Optimizer`` casts every floating state tensor to its parameter's dtype
        (and integer indices would become floats); our state keeps its own dtypes, so after
        the regular load each tensor is put back with its saved dtype and resume is bit-exact.
        """
        mine = self.structure()
        differences = self._structure_differences(state_dict, mine)
        reproject = reproject or self.reproject_on_load
        if differences and not reproject:
            raise ValueError(
                f"Cannot load this optimizer state into {type(self).__name__}: its structure "
                "differs (" + "; ".join(differences) + "). Build the optimizer with the saved "
                "settings, or pass reproject=True (attribute reproject_on_load=True) to keep "
                "this optimizer's settings and recompute subspaces and moments at the next step."
            )
        whole = any(not d.startswith(("group ", "param groups")) for d in differences)
        if whole:  # another optimizer, rule or projector: nothing of it applies here
            self.state.clear()
            self._warn_reprojected(differences)
            return
        sd = {k: v for k, v in state_dict.items() if k != self.STRUCTURE_KEY}
        before = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(sd)
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            for key, value in sd["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device)
        if not differences:
            return
        for g, (group, keys) in enumerate(zip(self.param_groups, mine["groups"], strict=True)):
            changed = {k: v for k, v in keys.items() if group.get(k, v) != v}
            for key, value in before[g].items():  # keys the saved groups do not have
                group.setdefault(key, value)
            group.update(keys)
            if changed:
                for p in group["params"]:
                    self.state.pop(p, None)
        self._warn_reprojected(differences)

    @staticmethod
    def _warn_reprojected(differences: list[str]) -> None:
        warnings.warn("Loaded an optimizer state of another structure; subspaces and moments "
                      "of the affected parameters restart at the next step: "
                      + "; ".join(differences), RuntimeWarning, stacklevel=3)

    # -- copy / pickle ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """torch pickles only ``defaults``, ``state`` and ``param_groups``; the rule, projector
        and settings travel too, so a deep-copied or unpickled optimizer steps like this one
        (torch re-creates the hook registries, which are not copied)."""
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items()
                      if k not in state and "hook" not in k and k != "_layouts"})
        state["_layouts"] = {}  # keyed by id(group): meaningless in the copy
        return state
