"""Shared plumbing of the callbacks: finding our optimizer behind the Trainer's wrappers, naming
layer types, and logging through the Trainer's own ``log`` so every ``report_to`` integration
(wandb, tensorboard, ...) and the console receive the metrics."""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

# the validators and the optimizer lookup are transformers-free: defined once, in the library
from lowrank_optim.schedules import (  # noqa: F401  (re-exported)
    innermost_optimizer,
    layerwise_optimizer,
    lowrank_optimizer,
)
from lowrank_optim.validation import check_bool, check_real, did_you_mean  # noqa: F401

logger = logging.getLogger("lowrank_optim")


def check_every(value: Any) -> None:
    """``every`` of the logging callbacks: ``None`` or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"Invalid every={value!r}: pass an integer >= 1 (optimizer steps "
                         "between logs) or None for TrainingArguments.logging_steps.")


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
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(f"bind() takes the transformers.Trainer whose log() receives the "
                            f"metrics, got {type(trainer).__name__}.")
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
