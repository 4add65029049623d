"""``SubspaceRefreshCallback``: when each layer's low-rank subspace is recomputed.

The callback owns the timing: on train begin it sets ``update_proj_gap=None`` on the projected
groups (the optimizer keeps no fixed gap of its own) and from then on calls
``optimizer.request_refresh(params)`` before the steps where a layer is due.  Each layer has
its own gap and next refresh step; the first periodic refreshes are staggered so that about
``layers / gap`` layers refresh per step instead of all of them every ``gap`` steps (no
periodic step-time spikes).

Schedules (all JSON-serialisable, so the callback's state goes into ``trainer_state.json``):

* :class:`FixedGap` -- every ``gap`` steps (GaLore).
* :class:`WarmupGap` -- every ``warmup_gap`` steps during the first ``warmup_steps``, then
  every ``gap``.
* :class:`GrowingGap` -- the gap is multiplied by ``factor`` after each refresh, up to
  ``max_gap``.
* :class:`AdaptiveGap` -- Q-GaLore style: after a refresh whose new subspace overlaps the old
  one by at least ``overlap_threshold`` the layer's gap is multiplied by ``factor`` (subspaces
  that agree need refreshing less); optionally, every ``check_every`` steps, a layer whose
  subspace captures less than ``energy_threshold`` of its gradient's energy is refreshed at
  once and its gap divided by ``factor`` (not below ``min_gap``).

Overlap and captured energy are read from :meth:`LowRankOptimizer.subspace_stats`; energy is
computed only on check steps, from the gradients present in ``on_pre_optimizer_step``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.validation import check_int_at_least
from trainer_callbacks._common import (
    check_bool,
    check_real,
    did_you_mean,
    innermost_optimizer,
    layerwise_optimizer,
    lowrank_optimizer,
)

logger = logging.getLogger("lowrank_optim")


def _check_unit(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= check_real(name, value) <= 1.0:
        raise ValueError(f"Invalid {name}={value!r}: must be in [0, 1] or None.")


def _check_factor(factor: float) -> None:
    value = check_real("factor", factor)
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(f"Invalid factor={factor!r}: must be a finite number >= 1.")


@dataclass(frozen=True)
class FixedGap:
    """Refresh every ``gap`` optimizer steps."""

    gap: int = 200

    def __post_init__(self) -> None:
        check_int_at_least("gap", self.gap, 1)

    def initial_gap(self) -> int:
        return self.gap

    def next_gap(self, *, step: int, gap: int, overlap: float | None) -> int:
        """Gap after a refresh at ``step`` (``gap``: the layer's current gap)."""
        return self.gap


@dataclass(frozen=True)
class WarmupGap:
    """Refresh every ``warmup_gap`` steps before step ``warmup_steps``, then every ``gap``
    (subspaces move fast early in training)."""

    warmup_steps: int = 1000
    warmup_gap: int = 50
    gap: int = 200

    def __post_init__(self) -> None:
        check_int_at_least("warmup_steps", self.warmup_steps, 0)
        check_int_at_least("warmup_gap", self.warmup_gap, 1)
        check_int_at_least("gap", self.gap, 1)

    def initial_gap(self) -> int:
        return self.warmup_gap if self.warmup_steps > 0 else self.gap

    def next_gap(self, *, step: int, gap: int, overlap: float | None) -> int:
        return self.warmup_gap if step < self.warmup_steps else self.gap


@dataclass(frozen=True)
class GrowingGap:
    """Start at ``gap``; multiply a layer's gap by ``factor`` after each refresh, up to
    ``max_gap`` (``None``: unbounded)."""

    gap: int = 50
    factor: float = 2.0
    max_gap: int | None = None

    def __post_init__(self) -> None:
        check_int_at_least("gap", self.gap, 1)
        _check_factor(self.factor)
        if self.max_gap is not None:
            check_int_at_least("max_gap", self.max_gap, self.gap)

    def initial_gap(self) -> int:
        return self.gap

    def next_gap(self, *, step: int, gap: int, overlap: float | None) -> int:
        return _grow(gap, self.factor, self.max_gap)


@dataclass(frozen=True)
class AdaptiveGap:
    """Per-layer gaps driven by the subspaces themselves (Q-GaLore's rule, plus an optional
    captured-energy trigger).

    Parameters
    ----------
    gap
        Initial gap of every layer.
    overlap_threshold
        After a refresh, a layer whose new subspace overlaps the previous one by at least this
        (:meth:`Projector.overlap`, mean squared cosine of the principal angles) gets its gap
        multiplied by ``factor``.  Q-GaLore doubles at a cosine similarity of 0.4.  ``None``
        disables the rule (and overlap tracking).
    energy_threshold
        Every ``check_every`` steps, a layer whose current subspace captures less than this
        share of its gradient's energy is refreshed in that step and its gap divided by
        ``factor``.  ``None`` (default) disables the check (it costs one projection and
        back-projection per layer on check steps; not available in layer-wise mode, where
        gradients are freed before the callback runs).
    factor, min_gap, max_gap
        Multiplier and bounds of a layer's gap.
    check_every
        Steps between energy checks.
    """

    gap: int = 200
    overlap_threshold: float | None = 0.4
    energy_threshold: float | None = None
    factor: float = 2.0
    min_gap: int = 1
    max_gap: int | None = None
    check_every: int = 10

    def __post_init__(self) -> None:
        check_int_at_least("gap", self.gap, 1)
        _check_unit("overlap_threshold", self.overlap_threshold)
        _check_unit("energy_threshold", self.energy_threshold)
        _check_factor(self.factor)
        check_int_at_least("min_gap", self.min_gap, 1)
        if self.min_gap > self.gap:
            raise ValueError(f"Invalid min_gap={self.min_gap}: it exceeds gap={self.gap}, the "
                             "initial gap; use min_gap <= gap.")
        if self.max_gap is not None:
            check_int_at_least("max_gap", self.max_gap, max(self.gap, self.min_gap))
        check_int_at_least("check_every", self.check_every, 1)

    def initial_gap(self) -> int:
        return self.gap

    def next_gap(self, *, step: int, gap: int, overlap: float | None) -> int:
        if (self.overlap_threshold is not None and overlap is not None
                and overlap >= self.overlap_threshold):
            return _grow(gap, self.factor, self.max_gap)
        return gap

    def shrunk_gap(self, gap: int) -> int:
        """Gap after an early, energy-triggered refresh."""
        return max(self.min_gap, int(gap / self.factor))


def _grow(gap: int, factor: float, max_gap: int | None) -> int:
    grown = max(gap + 1, int(round(gap * factor))) if factor > 1 else gap
    return grown if max_gap is None else min(grown, max_gap)


Schedule = FixedGap | WarmupGap | GrowingGap | AdaptiveGap
SCHEDULES: dict[str, type] = {
    "fixed": FixedGap, "warmup": WarmupGap, "growing": GrowingGap, "adaptive": AdaptiveGap,
}


def schedule_to_dict(schedule: Schedule) -> dict[str, Any]:
    """``{"kind": ..., **fields}`` (JSON-serialisable)."""
    kind = next(k for k, cls in SCHEDULES.items() if isinstance(schedule, cls))
    return {"kind": kind, **dataclasses.asdict(schedule)}


def make_schedule(spec: Schedule | dict[str, Any] | str | int | None) -> Schedule:
    """A schedule from an instance, a :func:`schedule_to_dict` dict, a kind name (defaults) or
    an int (a fixed gap)."""
    if spec is None:
        return FixedGap()
    if isinstance(spec, (FixedGap, WarmupGap, GrowingGap, AdaptiveGap)):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return FixedGap(spec)
    if isinstance(spec, str):
        if spec.strip().isdigit():
            raise ValueError(f"schedule={spec!r} is a string: pass the gap as an int "
                             f"({int(spec)}) for a fixed gap, or a kind name.")
        spec = {"kind": spec}
    if isinstance(spec, dict):
        fields = dict(spec)
        kind = fields.pop("kind", "fixed")
        if not isinstance(kind, str) or kind not in SCHEDULES:
            raise ValueError(f"Unknown schedule kind={kind!r}.{did_you_mean(kind, SCHEDULES)} "
                             f"Choose one of {sorted(SCHEDULES)}.")
        cls = SCHEDULES[kind]
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"Unknown field {unknown[0]!r} for schedule kind={kind!r} "
                            f"({cls.__name__}).{did_you_mean(unknown[0], known)} "
                            f"It takes {known}.")
        return cls(**fields)
    raise TypeError(f"schedule={spec!r}: pass a schedule object, a dict, a kind name or an int.")


def check_schedulable(optimizer: Any, *, who: str = "SubspaceRefreshCallback") -> None:
    """Raise unless a refresh schedule can drive ``optimizer`` (an instance or a class).

    It must be a :class:`LowRankOptimizer` whose refresh timing is ``update_proj_gap``
    (:meth:`LowRankOptimizer.request_refresh` not overridden, which rules out ``SSTAdamW``).
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if not issubclass(cls, LowRankOptimizer):
        raise TypeError(
            f"{who} needs a lowrank_optim.LowRankOptimizer (got {cls.__name__}, which has no "
            "subspaces to refresh); pass one with Trainer(optimizers=(opt, None)) or "
            "trainer_callbacks.attach(trainer, 'galore_adamw', ...), or drop the schedule."
        )
    if cls.request_refresh is not LowRankOptimizer.request_refresh:
        raise ValueError(
            f"{cls.__name__} defines its own refresh semantics (SSTAdamW redraws its "
            "vectors every iteration_length steps and re-decomposes on its own rounds); "
            f"{who} schedules optimizers timed by update_proj_gap (GaLore, DCT): drop the "
            "schedule and set iteration_length instead."
        )


class SubspaceRefreshCallback(TrainerCallback, ExportableState):
    """Decide, per layer, at which steps its subspace is recomputed.

    Parameters
    ----------
    schedule
        A :class:`FixedGap`, :class:`WarmupGap`, :class:`GrowingGap` or :class:`AdaptiveGap`,
        its dict form, a kind name (``"fixed"``, ``"warmup"``, ``"growing"``, ``"adaptive"``
        with default settings) or an int (fixed gap).
    stagger
        Spread the first periodic refreshes of the layers evenly over the first gap.

    Notes
    -----
    The per-layer schedule is saved in checkpoints through transformers' ``ExportableState``
    (``trainer_state.json``, ``stateful_callbacks``); the Trainer restores it on
    ``train(resume_from_checkpoint=...)`` when ``TrainingArguments(
    restore_callback_states_from_checkpoint=True)``.  Without that flag a resumed run rebuilds
    the schedule from the optimizer's ``refresh_step`` with the initial gap (exact for
    :class:`FixedGap`) and warns.

    Works with any :class:`~lowrank_optim.LowRankOptimizer` whose refresh timing is
    ``update_proj_gap`` (GaLore, DCT), also in layer-wise mode (requests are made in
    ``on_step_begin``, before the backward pass in which parameters step).  ``SSTAdamW``
    redraws its vectors on its own ``iteration_length`` schedule and is rejected.

    Examples
    --------
    >>> cb = SubspaceRefreshCallback(AdaptiveGap(gap=100, overlap_threshold=0.4, max_gap=800))
    >>> trainer = Trainer(..., optimizers=(opt, None), callbacks=[cb])
    """

    def __init__(
        self,
        schedule: Schedule | dict[str, Any] | str | int | None = None,
        stagger: bool = True,
    ) -> None:
        check_bool("stagger", stagger)
        self.schedule = make_schedule(schedule)
        self.stagger = stagger
        #: per projected parameter (``projected_params`` order): ``next`` (step of the next
        #: scheduled refresh), ``gap``, ``last`` (step of the last refresh) and ``refreshes``
        self.layers: list[dict[str, Any]] | None = None
        self._optimizer: LowRankOptimizer | None = None
        self._params: list = []
        self._names: list[str] = []
        self._pending: set[int] = set()
        self._early: set[int] = set()
        self._layerwise = False

    # -- ExportableState ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "args": {"schedule": schedule_to_dict(self.schedule), "stagger": self.stagger},
            "attributes": {"layers": self.layers},
        }

    # -- public view ------------------------------------------------------------------------
    def gaps(self) -> dict[str, int]:
        """Current gap of each layer, by parameter name."""
        return {n: layer["gap"] for n, layer in zip(self._names, self.layers or [], strict=False)}

    # -- setup --------------------------------------------------------------------------------
    def _init_layers(self, step: int) -> list[dict[str, Any]]:
        gap, n = self.schedule.initial_gap(), len(self._params)
        layers = []
        for i in range(n):
            phase = (i * gap) // n if self.stagger else 0
            layers.append({"next": step + gap - phase, "gap": gap, "last": None, "refreshes": 0})
        return layers

    def _rebuild_layers(self) -> list[dict[str, Any]]:
        """Layers of a run resumed without callback state: from each subspace's last refresh."""
        gap = self.schedule.initial_gap()
        layers = []
        for row in self._optimizer.subspace_stats(energy=False):
            last = row["refresh_step"] or 0
            layers.append({"next": last + gap, "gap": gap, "last": row["refresh_step"],
                           "refreshes": 0})
        return layers

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = lowrank_optimizer(optimizer)
        check_schedulable(innermost_optimizer(optimizer) if opt is None else opt)
        self._optimizer = opt
        for group in opt.param_groups:
            if group.get("rank") is not None:
                group["update_proj_gap"] = None  # the callback owns the timing from now on
        rows = opt.projected_params()
        self._params = [p for _, p, _ in rows]
        self._names = [n for n, _, _ in rows]
        if isinstance(self.schedule, AdaptiveGap) and self.schedule.overlap_threshold is not None:
            opt.track_subspace_overlap(True)
        self._layerwise = layerwise_optimizer(optimizer) is not None
        if (self._layerwise and isinstance(self.schedule, AdaptiveGap)
                and self.schedule.energy_threshold is not None):
            logger.warning("SubspaceRefreshCallback: energy_threshold is ignored in layer-wise "
                           "mode (gradients are freed during backward); overlap still applies.")
        if self.layers is not None and len(self.layers) == len(self._params):
            return  # restored from a checkpoint (ExportableState)
        if state.global_step > 0:
            logger.warning(
                "SubspaceRefreshCallback: resuming at step %d without saved schedule state; "
                "rebuilding it from the optimizer's last refresh steps with the initial gap. "
                "Pass TrainingArguments(restore_callback_states_from_checkpoint=True) to "
                "resume the schedule exactly.", state.global_step)
            self.layers = self._rebuild_layers()
        else:
            self.layers = self._init_layers(state.global_step)

    # -- per step -------------------------------------------------------------------------------
    def _request(self, indices: list[int]) -> None:
        if indices:
            self._optimizer.request_refresh([self._params[i] for i in indices])
            self._pending.update(indices)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._optimizer is None:
            return
        step = state.global_step
        self._request([i for i, layer in enumerate(self.layers)
                       if layer["next"] <= step and i not in self._pending])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        schedule = self.schedule
        if (self._optimizer is None or self._layerwise or not isinstance(schedule, AdaptiveGap)
                or schedule.energy_threshold is None
                or state.global_step % schedule.check_every):
            return
        candidates = [i for i in range(len(self._params)) if i not in self._pending]
        rows = self._optimizer.subspace_stats([self._params[i] for i in candidates])
        low = [i for i, row in zip(candidates, rows, strict=True)
               if row["captured_energy"] is not None
               and row["captured_energy"] < schedule.energy_threshold]
        self._request(low)
        self._early.update(low)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._optimizer is None or not self._pending:
            return
        step = state.global_step
        pending = sorted(self._pending)
        rows = self._optimizer.subspace_stats([self._params[i] for i in pending], energy=False)
        for i, row in zip(pending, rows, strict=True):
            if row["steps_since_refresh"] != 1:
                continue  # no gradient reached it this step: the request stays for the next
            layer = self.layers[i]
            if i in self._early and isinstance(self.schedule, AdaptiveGap):
                gap = self.schedule.shrunk_gap(layer["gap"])
            else:
                gap = self.schedule.next_gap(step=step, gap=layer["gap"], overlap=row["overlap"])
            layer.update(gap=gap, next=step + gap, last=step, refreshes=layer["refreshes"] + 1)
            self._pending.discard(i)
            self._early.discard(i)
