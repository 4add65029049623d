"""Shared plumbing of the callbacks: finding our optimizer behind the Trainer's wrappers, naming
layer types, and logging through the Trainer's own ``log`` so every ``report_to`` integration
(wandb, tensorboard, ...) and the console receive the metrics."""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.optim.base import LowRankOptimizer

logger = logging.getLogger("lowrank_optim")


def _chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps (accelerate's ``AcceleratedOptimizer.optimizer``,
    :class:`LayerwiseOptimizer.optimizer`), outermost first."""
    out, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        out.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer holding the state, behind any wrappers (``None`` stays ``None``)."""
    chain = _chain(optimizer)
    return chain[-1] if chain else None


def lowrank_optimizer(optimizer: Any) -> LowRankOptimizer | None:
    """The :class:`LowRankOptimizer` behind the Trainer's optimizer, or ``None``."""
    return next((o for o in _chain(optimizer) if isinstance(o, LowRankOptimizer)), None)


def layerwise_optimizer(optimizer: Any) -> LayerwiseOptimizer | None:
    """The :class:`LayerwiseOptimizer` behind the Trainer's optimizer, or ``None``."""
    return next((o for o in _chain(optimizer) if isinstance(o, LayerwiseOptimizer)), None)


def layer_type(name: str) -> str:
    """Module type of a parameter name: ``model.layers.3.self_attn.q_proj.weight`` ->
    ``q_proj`` (the parameter's module, last component)."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def interval(every: int | None, args: Any, state: Any) -> int:
    """``every``, or the Trainer's logging interval (``logging_steps``, a fraction of the run
    when below 1) when ``every`` is ``None``."""
    if every is not None:
        return max(1, int(every))
    steps = getattr(args, "logging_steps", 500) or 500
    if steps < 1:
        return max(1, math.ceil((getattr(state, "max_steps", 0) or 1) * steps))
    return max(1, int(steps))


class LoggingCallback(TrainerCallback):
    """Base of the callbacks that log metrics.

    Bound to a Trainer (:meth:`bind`, done by :func:`trainer_callbacks.attach`), metrics go
    through ``trainer.log``: ``state.log_history``, the console and every ``report_to``
    integration.  A callback passed as ``Trainer(callbacks=[...])`` has no handle on the
    Trainer (callbacks receive none, and run after the integrations), so unbound metrics are
    appended to ``state.log_history`` only, with a one-time warning when integrations are on.
    """

    def __init__(self) -> None:
        self.trainer: Any = None
        self._warned_unbound = False

    def bind(self, trainer: Any) -> LoggingCallback:
        """Log through ``trainer.log`` (returns ``self``)."""
        self.trainer = trainer
        return self

    def emit(self, metrics: dict[str, float], args: Any, state: Any, control: Any) -> None:
        """Log ``metrics`` for the current step."""
        if not metrics:
            return
        if self.trainer is not None:
            # the handler's on_log clears control.should_log, which would drop the Trainer's
            # own log of this step: keep the flag as it was
            should_log = control.should_log
            self.trainer.log(dict(metrics))
            control.should_log = should_log
            return
        state.log_history.append({**metrics, "step": state.global_step})
        report_to = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if report_to and not self._warned_unbound:
            self._warned_unbound = True
            logger.warning(
                "%s is not bound to the Trainer, so its metrics reach state.log_history but not "
                "%s; add it with trainer_callbacks.attach(trainer, ...) or call .bind(trainer).",
                type(self).__name__, ", ".join(report_to))
