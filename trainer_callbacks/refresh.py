"""``SubspaceRefreshCallback``: the Hugging Face Trainer adapter of
:class:`lowrank_optim.schedules.RefreshScheduler` (when each layer's subspace is recomputed).

The schedules and the per-layer bookkeeping live in :mod:`lowrank_optim.schedules` (usable from
any training loop); this module wires them to the Trainer's events and checkpoints, and
re-exports the schedule names (``from trainer_callbacks.refresh import FixedGap`` keeps
working).  On train begin the callback builds a :class:`RefreshScheduler` on the Trainer's
optimizer, which sets ``update_proj_gap=None`` on the projected groups and from then on calls
``optimizer.request_refresh(params)`` before the steps where a layer is due.

Schedules (all JSON-serialisable, so the callback's state goes into ``trainer_state.json``):
:class:`FixedGap`, :class:`WarmupGap`, :class:`GrowingGap`, :class:`AdaptiveGap` (see
:mod:`lowrank_optim.schedules`).  Overlap and captured energy are read from
:meth:`LowRankOptimizer.subspace_stats`; energy is computed only on check steps, from the
gradients present in ``on_pre_optimizer_step``.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from lowrank_optim import schedules
from lowrank_optim.schedules import (  # noqa: F401  (re-exported: schedules.__all__)
    SCHEDULES,
    AdaptiveGap,
    FixedGap,
    GrowingGap,
    RefreshScheduler,
    Schedule,
    WarmupGap,
    make_schedule,
    schedule_to_dict,
)
from lowrank_optim.schedules import check_schedulable as _check_schedulable
from trainer_callbacks._common import check_bool, innermost_optimizer, lowrank_optimizer

__all__ = ["SubspaceRefreshCallback", *schedules.__all__]  # noqa: PLE0604
# every name of schedules.__all__ is importable from here (checked by the tests)

logger = logging.getLogger("lowrank_optim")

#: how to hand the Trainer a low-rank optimizer, for :func:`check_schedulable`'s message
TRAINER_HINT = ("pass one with Trainer(optimizers=(opt, None)) or "
                "trainer_callbacks.attach(trainer, 'galore_adamw', ...), or drop the schedule")


def check_schedulable(optimizer: Any, *, who: str = "SubspaceRefreshCallback") -> None:
    """:func:`lowrank_optim.schedules.check_schedulable` with the Trainer's hint: raise unless
    a refresh schedule can drive ``optimizer`` (an instance or a class)."""
    _check_schedulable(optimizer, who=who, hint=TRAINER_HINT)


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
        self.scheduler: RefreshScheduler | None = None
        self._layers: list[dict[str, Any]] | None = None

    @property
    def layers(self) -> list[dict[str, Any]] | None:
        """Per projected parameter: ``next``, ``gap``, ``last`` and ``refreshes`` (see
        :attr:`RefreshScheduler.layers`); set by the Trainer when it restores the callback."""
        return self._layers if self.scheduler is None else self.scheduler.layers

    @layers.setter
    def layers(self, value: list[dict[str, Any]] | None) -> None:
        self._layers = value
        if self.scheduler is not None:
            self.scheduler.layers = value

    # -- ExportableState ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The constructor's arguments and the per-layer schedule (``trainer_state.json``)."""
        return {
            "args": {"schedule": schedule_to_dict(self.schedule), "stagger": self.stagger},
            "attributes": {"layers": self.layers},
        }

    # -- public view --------------------------------------------------------------------------
    def gaps(self) -> dict[str, int]:
        """Current gap of each layer, by parameter name."""
        return {} if self.scheduler is None else self.scheduler.gaps()

    # -- events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        """Build the :class:`RefreshScheduler` on the Trainer's optimizer (it takes the refresh
        timing over), keeping a restored schedule."""
        opt = lowrank_optimizer(optimizer)
        check_schedulable(innermost_optimizer(optimizer) if opt is None else opt)
        layers = self.layers  # restored from a checkpoint (ExportableState), or a former run
        scheduler = RefreshScheduler(optimizer, self.schedule, stagger=self.stagger,
                                     name=type(self).__name__)
        scheduler.layers = layers
        self.scheduler = scheduler
        if scheduler.start(state.global_step) == "rebuilt":
            logger.warning(
                "SubspaceRefreshCallback: resuming at step %d without saved schedule state; "
                "rebuilding it from the optimizer's last refresh steps with the initial gap. "
                "Pass TrainingArguments(restore_callback_states_from_checkpoint=True) to "
                "resume the schedule exactly.", state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        """Request the refreshes due at this step (before backward)."""
        if self.scheduler is not None:
            self.scheduler.before_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """:class:`AdaptiveGap`'s energy check, while the gradients exist."""
        if self.scheduler is not None:
            self.scheduler.before_optimizer_step(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Next gaps and refresh steps of the layers refreshed in this step."""
        if self.scheduler is not None:
            self.scheduler.after_step(state.global_step)
