"""Refresh schedules: when each layer's low-rank subspace is recomputed, for any training loop.

A :class:`RefreshScheduler` owns the refresh timing of a :class:`LowRankOptimizer`: it sets
``update_proj_gap=None`` on the projected groups (the optimizer keeps no fixed gap of its own)
and calls ``optimizer.request_refresh(params)`` before the steps where a layer is due.  Each
layer has its own gap and next refresh step; the first periodic refreshes are staggered so that
about ``layers / gap`` layers refresh per step instead of all of them every ``gap`` steps (no
periodic step-time spikes).

Schedules (frozen dataclasses, JSON-serialisable with :func:`schedule_to_dict`):

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

Overlap and captured energy are read from :meth:`LowRankOptimizer.subspace_stats`.  This module
needs neither transformers nor accelerate; ``trainer_callbacks.SubspaceRefreshCallback`` is the
Hugging Face Trainer adapter of :class:`RefreshScheduler`.

Examples
--------
A plain training loop (``step`` counts the optimizer steps done before this one):

>>> scheduler = RefreshScheduler(optimizer, AdaptiveGap(gap=100, max_gap=800))
>>> for step in range(max_steps):
...     scheduler.before_step(step)            # before backward (layer-wise mode steps there)
...     loss_fn(model(batch)).backward()
...     scheduler.before_optimizer_step(step)  # gradients present: energy checks
...     optimizer.step()
...     scheduler.after_step(step)             # adapts the gaps of the refreshed layers
...     optimizer.zero_grad()
>>> json.dumps(scheduler.state_dict())         # checkpoint it with the optimizer
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.validation import check_bool, check_int_at_least, check_real, did_you_mean
from lowrank_optim.wrappers import innermost_optimizer, wrapper_chain

__all__ = [
    "SCHEDULES",
    "AdaptiveGap",
    "FixedGap",
    "GrowingGap",
    "RefreshScheduler",
    "Schedule",
    "WarmupGap",
    "check_schedulable",
    "make_schedule",
    "schedule_to_dict",
]

logger = logging.getLogger("lowrank_optim")


def _check_unit(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= check_real(name, value) <= 1.0:
        raise ValueError(f"Invalid {name}={value!r}: must be in [0, 1] or None.")


def _check_factor(factor: float) -> None:
    value = check_real("factor", factor)
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(f"Invalid factor={factor!r}: must be a finite number >= 1.")


# -- finding the optimizer behind wrappers ----------------------------------------------------
def lowrank_optimizer(optimizer: Any) -> LowRankOptimizer | None:
    """The :class:`LowRankOptimizer` behind ``optimizer``'s wrappers, or ``None``."""
    return next((o for o in wrapper_chain(optimizer) if isinstance(o, LowRankOptimizer)), None)


def layerwise_optimizer(optimizer: Any) -> LayerwiseOptimizer | None:
    """The :class:`LayerwiseOptimizer` behind ``optimizer``'s wrappers, or ``None``."""
    return next((o for o in wrapper_chain(optimizer) if isinstance(o, LayerwiseOptimizer)), None)


# -- schedules --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedGap:
    """Refresh every ``gap`` optimizer steps."""

    gap: int = 200

    def __post_init__(self) -> None:
        check_int_at_least("gap", self.gap, 1)

    def initial_gap(self) -> int:
        """Gap of every layer before its first scheduled refresh."""
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
        """Gap of every layer before its first scheduled refresh."""
        return self.warmup_gap if self.warmup_steps > 0 else self.gap

    def next_gap(self, *, step: int, gap: int, overlap: float | None) -> int:
        """Gap after a refresh at ``step``."""
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
        """Gap of every layer before its first scheduled refresh."""
        return self.gap

    def next_gap(self, *, step: int, gap: int, overlap: float | None) -> int:
        """Gap after a refresh at ``step``: ``gap`` grown by ``factor``."""
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
        gradients are freed before the optimizer step).
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
        """Gap of every layer before its first scheduled refresh."""
        return self.gap

    def next_gap(self, *, step: int, gap: int, overlap: float | None) -> int:
        """Gap after a scheduled refresh: grown when the subspaces agreed (``overlap``)."""
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
#: schedule classes by the ``kind`` of their dict form
SCHEDULES: dict[str, type] = {
    "fixed": FixedGap, "warmup": WarmupGap, "growing": GrowingGap, "adaptive": AdaptiveGap,
}


def schedule_to_dict(schedule: Schedule) -> dict[str, Any]:
    """``{"kind": ..., **fields}`` (JSON-serialisable)."""
    kind = next(k for k, cls in SCHEDULES.items() if isinstance(schedule, cls))
    return {"kind": kind, **dataclasses.asdict(schedule)}


def _schedule_from_dict(spec: dict[str, Any]) -> Schedule:
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


def make_schedule(spec: Schedule | dict[str, Any] | str | int | None) -> Schedule:
    """A schedule from an instance, a :func:`schedule_to_dict` dict, a kind name (defaults) or
    an int (a fixed gap); ``None`` is ``FixedGap()``."""
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
        return _schedule_from_dict(spec)
    raise TypeError(f"schedule={spec!r}: pass a schedule object, a dict, a kind name or an int.")


#: the end of :func:`check_schedulable`'s message for an optimizer without subspaces
NO_SUBSPACES_HINT = ("build one with lowrank_optim.create_optimizer(model, 'galore_adamw', "
                     "...), or drop the schedule")


def check_schedulable(optimizer: Any, *, who: str = "RefreshScheduler",
                      hint: str = NO_SUBSPACES_HINT) -> None:
    """Raise unless a refresh schedule can drive ``optimizer`` (an instance or a class).

    It must be a :class:`LowRankOptimizer` whose projector's refreshes are timed by
    ``update_proj_gap`` / :meth:`LowRankOptimizer.request_refresh`
    (``projector_type.refresh_timing == "gap"``), which rules out ``SSTAdamW``: its sampled
    projector times its own refreshes.

    Parameters
    ----------
    optimizer
        The optimizer, or its class.
    who
        What needs the schedule, for the messages.
    hint
        How to get a low-rank optimizer, ending the ``TypeError``'s message.

    Raises
    ------
    TypeError
        Not a :class:`LowRankOptimizer`.
    ValueError
        A low-rank optimizer that times its own refreshes.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if not issubclass(cls, LowRankOptimizer):
        raise TypeError(
            f"{who} needs a lowrank_optim.LowRankOptimizer (got {cls.__name__}, which has no "
            f"subspaces to refresh); {hint}."
        )
    if cls.projector_type.refresh_timing != "gap":
        raise ValueError(
            f"{cls.__name__} defines its own refresh semantics (SSTAdamW redraws its "
            "vectors every iteration_length steps and re-decomposes on its own rounds); "
            f"{who} schedules optimizers timed by update_proj_gap (GaLore, DCT): drop the "
            "schedule and set iteration_length instead."
        )


# -- the per-layer bookkeeping ----------------------------------------------------------------
class RefreshScheduler:
    """Decide, per layer, at which steps its subspace is recomputed; usable from any loop.

    Parameters
    ----------
    optimizer
        A :class:`LowRankOptimizer` whose refreshes are timed by ``update_proj_gap`` (GaLore,
        DCT), possibly behind wrappers (accelerate's ``AcceleratedOptimizer``,
        :class:`~lowrank_optim.layerwise.LayerwiseOptimizer`).  Its projected groups get
        ``update_proj_gap=None``: the scheduler owns the timing from now on.
    schedule
        A :class:`FixedGap`, :class:`WarmupGap`, :class:`GrowingGap` or :class:`AdaptiveGap`,
        its dict form, a kind name (``"fixed"``, ``"warmup"``, ``"growing"``, ``"adaptive"``
        with default settings) or an int (fixed gap); see :func:`make_schedule`.
    stagger
        Spread the first periodic refreshes of the layers evenly over the first gap.
    name
        What messages and warnings call this scheduler.

    Attributes
    ----------
    layers : list of dict or None
        Per projected parameter (:meth:`LowRankOptimizer.projected_params` order): ``next``
        (step of the next scheduled refresh), ``gap``, ``last`` (step of the last refresh) and
        ``refreshes``; ``None`` before :meth:`start`.

    Notes
    -----
    Call :meth:`before_step` before each step's forward/backward pass (layer-wise mode steps
    parameters during backward), :meth:`before_optimizer_step` once the gradients exist (only
    :class:`AdaptiveGap`'s energy checks use it) and :meth:`after_step` after
    ``optimizer.step()``, each with the number of optimizer steps done before this one.
    Save :meth:`state_dict` (JSON) with the optimizer to resume the schedule exactly.
    """

    def __init__(self, optimizer: Any, schedule: Schedule | dict[str, Any] | str | int | None
                 = None, *, stagger: bool = True, name: str = "RefreshScheduler") -> None:
        check_bool("stagger", stagger)
        self.schedule = make_schedule(schedule)
        self.stagger = stagger
        self.name = name
        opt = lowrank_optimizer(optimizer)
        check_schedulable(innermost_optimizer(optimizer) if opt is None else opt, who=name)
        self.optimizer: LowRankOptimizer = opt
        self.layerwise = layerwise_optimizer(optimizer) is not None
        self.layers: list[dict[str, Any]] | None = None
        self._pending: set[int] = set()
        self._early: set[int] = set()
        rows = opt.projected_params()
        self._params = [p for _, p, _ in rows]
        self.names = [n for n, _, _ in rows]
        self._take_timing()

    def _take_timing(self) -> None:
        """Switch the optimizer's own gap off; track overlaps when the schedule reads them."""
        for group in self.optimizer.param_groups:
            if group.get("rank") is not None:
                group["update_proj_gap"] = None  # the scheduler owns the timing from now on
        schedule = self.schedule
        if isinstance(schedule, AdaptiveGap) and schedule.overlap_threshold is not None:
            self.optimizer.track_subspace_overlap(True)
        if (self.layerwise and isinstance(schedule, AdaptiveGap)
                and schedule.energy_threshold is not None):
            logger.warning("%s: energy_threshold is ignored in layer-wise mode (gradients are "
                           "freed during backward); overlap still applies.", self.name)

    # -- setup --------------------------------------------------------------------------------
    def start(self, step: int = 0) -> str:
        """Set up the per-layer schedule of a run whose first step is ``step``.

        Returns
        -------
        str
            ``"restored"`` (:attr:`layers` already set, e.g. by :meth:`load_state_dict`, for
            every projected parameter: kept), ``"rebuilt"`` (``step > 0`` without saved state:
            rebuilt from each subspace's last refresh with the initial gap, exact for
            :class:`FixedGap`) or ``"new"``.
        """
        if self.layers is not None and len(self.layers) == len(self._params):
            return "restored"
        if step > 0:
            self.layers = self._rebuild_layers()
            return "rebuilt"
        self.layers = self._init_layers(step)
        return "new"

    def _init_layers(self, step: int) -> list[dict[str, Any]]:
        gap, n = self.schedule.initial_gap(), len(self._params)
        layers = []
        for i in range(n):
            phase = (i * gap) // n if self.stagger else 0
            layers.append({"next": step + gap - phase, "gap": gap, "last": None, "refreshes": 0})
        return layers

    def _rebuild_layers(self) -> list[dict[str, Any]]:
        """Layers of a run resumed without saved state: from each subspace's last refresh."""
        gap = self.schedule.initial_gap()
        layers = []
        for row in self.optimizer.subspace_stats(energy=False):
            last = row["refresh_step"] or 0
            layers.append({"next": last + gap, "gap": gap, "last": row["refresh_step"],
                           "refreshes": 0})
        return layers

    def _ensure_started(self, step: int) -> None:
        if self.layers is None or len(self.layers) != len(self._params):
            if self.start(step) == "rebuilt":
                logger.warning(
                    "%s: starting at step %d without saved schedule state; rebuilding it from "
                    "the optimizer's last refresh steps with the initial gap. Save "
                    "state_dict() with the checkpoint and load_state_dict() it to resume the "
                    "schedule exactly.", self.name, step)

    # -- per step -----------------------------------------------------------------------------
    def _request(self, indices: list[int]) -> None:
        if indices:
            self.optimizer.request_refresh([self._params[i] for i in indices])
            self._pending.update(indices)

    def before_step(self, step: int) -> list[str]:
        """Request the refreshes due at ``step``; call it before the step's backward pass.

        Returns
        -------
        list of str
            Names of the parameters asked to refresh (requests still pending from an earlier
            step, for a parameter that received no gradient, are not repeated).
        """
        self._ensure_started(step)
        due = [i for i, layer in enumerate(self.layers)
               if layer["next"] <= step and i not in self._pending]
        self._request(due)
        return [self.names[i] for i in due]

    def before_optimizer_step(self, step: int) -> list[str]:
        """:class:`AdaptiveGap` energy check, while the gradients exist: on check steps, layers
        whose subspace captures less than ``energy_threshold`` of their gradient's energy are
        refreshed in this step.  A no-op for the other schedules and in layer-wise mode.

        Returns
        -------
        list of str
            Names of the parameters asked to refresh early.
        """
        schedule = self.schedule
        if (self.layers is None or self.layerwise or not isinstance(schedule, AdaptiveGap)
                or schedule.energy_threshold is None or step % schedule.check_every):
            return []
        candidates = [i for i in range(len(self._params)) if i not in self._pending]
        rows = self.optimizer.subspace_stats([self._params[i] for i in candidates])
        low = [i for i, row in zip(candidates, rows, strict=True)
               if row["captured_energy"] is not None
               and row["captured_energy"] < schedule.energy_threshold]
        self._request(low)
        self._early.update(low)
        return [self.names[i] for i in low]

    def after_step(self, step: int) -> list[str]:
        """After ``optimizer.step()``: each requested layer that refreshed gets its next gap
        (read from the refresh's overlap, for :class:`AdaptiveGap`) and next refresh step.

        Returns
        -------
        list of str
            Names of the parameters refreshed in this step at the scheduler's request.
        """
        if self.layers is None or not self._pending:
            return []
        pending = sorted(self._pending)
        rows = self.optimizer.subspace_stats([self._params[i] for i in pending], energy=False)
        done = [i for i, row in zip(pending, rows, strict=True) if self._advance(i, row, step)]
        return [self.names[i] for i in done]

    def _advance(self, i: int, row: dict[str, Any], step: int) -> bool:
        """Schedule layer ``i``'s next refresh if it refreshed at ``step``."""
        if row["steps_since_refresh"] != 1:
            return False  # no gradient reached it this step: the request stays for the next
        layer = self.layers[i]
        if i in self._early and isinstance(self.schedule, AdaptiveGap):
            gap = self.schedule.shrunk_gap(layer["gap"])
        else:
            gap = self.schedule.next_gap(step=step, gap=layer["gap"], overlap=row["overlap"])
        layer.update(gap=gap, next=step + gap, last=step, refreshes=layer["refreshes"] + 1)
        self._pending.discard(i)
        self._early.discard(i)
        return True

    # -- views and state ----------------------------------------------------------------------
    def gaps(self) -> dict[str, int]:
        """Current gap of each layer, by parameter name."""
        return {n: layer["gap"] for n, layer in zip(self.names, self.layers or [], strict=False)}

    def state_dict(self) -> dict[str, Any]:
        """The schedule, ``stagger`` and the per-layer state, as JSON-ready data."""
        return {"schedule": schedule_to_dict(self.schedule), "stagger": self.stagger,
                "layers": copy.deepcopy(self.layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s data (then :meth:`start` keeps it).

        Raises
        ------
        ValueError
            The state was saved with another schedule or ``stagger``, or for another number
            of projected parameters.
        """
        if not isinstance(state, dict) or not {"schedule", "stagger", "layers"} <= set(state):
            raise ValueError(f"{self.name}.load_state_dict expects the dict of state_dict() "
                             f"(schedule, stagger, layers), got {state!r:.200}.")
        saved = make_schedule(state["schedule"])
        if saved != self.schedule or state["stagger"] != self.stagger:
            raise ValueError(f"{self.name}: the state was saved with schedule={saved!r}, "
                             f"stagger={state['stagger']!r}; this scheduler runs "
                             f"{self.schedule!r}, stagger={self.stagger!r}. Build it with the "
                             "saved settings, or start the new schedule without the state.")
        layers = state["layers"]
        if layers is not None and len(layers) != len(self._params):
            raise ValueError(f"{self.name}: the state holds {len(layers)} layers, the optimizer "
                             f"projects {len(self._params)} parameters.")
        self.layers = copy.deepcopy(layers)
